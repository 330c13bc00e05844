"""A PyTorch masked autoencoder and its pretraining step: the reference that tools/bench_train.py times ours against.

Written from the official MAE recipe, in plain torch so that it runs wherever torch does (no timm or
torchvision import): conv patch embedding, a fixed 2-D sin-cos position table added before masking, per-sample
random masking by sorting uniform noise, pre-norm ViT blocks (qkv bias, MLP ratio 4, LayerNorm eps 1e-6,
attention through ``F.scaled_dot_product_attention``, which picks flash attention on GPU), a 512-wide decoder
with a learned mask token, and the norm-pix MSE on removed patches only.

The step does what ours does per iteration (dailymae_jax/train/steps.py), so that both sides do the same work:
uint8 NHWC images in, ImageNet normalisation and a random horizontal flip on device, the MAE loss under bf16
autocast with float32 master weights, AdamW with MAE's decay mask, and the online linear probe (BatchNorm
without affine → Linear, Adam) on the stop-gradient mean visible patch token before the final norm.
``measure_pretrain_step`` times that step as dailymae_jax.train.benchmark times ours.
"""

from __future__ import annotations

import contextlib
import platform
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sincos_table_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool) -> torch.Tensor:
    """MAE's fixed position table: row r·grid_w + c is [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)],
    ω_i = 1/10000^(i/(dim/4)), i < dim/4; an all-zero first row for the cls slot when ``cls_token``."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")
    col_angles = np.outer(cols.reshape(-1), omega)
    row_angles = np.outer(rows.reshape(-1), omega)
    table = np.concatenate([np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)], 1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], 0)
    return torch.from_numpy(table.astype(np.float32))


def patchify_nhwc(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W, C) → (B, L, p·p·C); tokens row-major, values ordered (row in patch, column in patch, channel)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keeps the int(L·(1 − ratio)) tokens of smallest noise per sample.

    Returns the kept tokens (B, keep, D) in ascending-noise order, the mask (B, L) in token order (1 = removed)
    and ids_restore (B, L), the inverse of the noise sort.
    """
    b, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(b, length, device=x.device, dtype=torch.float32)
    mask[:, :keep] = 0.0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def init_linear(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with exact GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MAEOutput(NamedTuple):
    loss: torch.Tensor      # scalar float32
    pred: torch.Tensor      # (B, L, p·p·3)
    mask: torch.Tensor      # (B, L), 1 = removed
    features: torch.Tensor  # (B, D) mean visible patch token after the last block, before the final norm


class TorchMAE(nn.Module):
    """MAE for one input resolution (the position tables are buffers sized for it)."""

    def __init__(self, *, width: int, depth: int, heads: int, patch: int, resolution: int, mlp_ratio: float = 4.0,
                 decoder_width: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 norm_pix_loss: bool = True):
        super().__init__()
        if resolution % patch:
            raise ValueError(f"resolution {resolution} is not divisible by the patch size {patch}")
        self.patch = patch
        self.norm_pix_loss = norm_pix_loss
        grid = resolution // patch
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_blocks = nn.ModuleList(Block(decoder_width, decoder_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_width, patch * patch * 3)
        # Constants, not parameters: they never reach the optimizer (as in ours).
        self.register_buffer("pos_embed", sincos_table_2d(width, grid, grid, cls_token=False)[None],
                             persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_table_2d(decoder_width, grid, grid, cls_token=True)[None],
                             persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch conv is a Linear over each flattened p×p×3 block: xavier over that view.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, noise: torch.Tensor, mask_ratio: float = 0.75) -> MAEOutput:
        """``images``: normalised float (B, H, W, 3); ``noise``: (B, L) uniform, smallest noise = kept."""
        x = self.patch_embed(images.permute(0, 3, 1, 2))  # a channels-last NCHW view: no copy
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        features = x[:, 1:].float().mean(dim=1)
        latent = self.norm(x)

        y = self.decoder_embed(latent)
        b, length = ids_restore.shape
        fill = self.mask_token.to(y.dtype).expand(b, length + 1 - y.shape[1], -1)
        patches = torch.cat([y[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, y.shape[2]))
        y = torch.cat([y[:, :1], patches], dim=1) + self.decoder_pos_embed.to(y.dtype)
        for block in self.decoder_blocks:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]

        target = patchify_nhwc(images.float(), self.patch)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, unbiased=True, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return MAEOutput(loss, pred, mask, features)


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters, then Linear: DailyMAE's online probe."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=0.1)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(features))


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE's decay mask: matrices, conv kernels and the (1, 1, D) tokens decay; 1-D biases and norms do not."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchPretrainStep:
    """One MAE + probe optimisation step on a uint8 NHWC batch; ``step(images, labels)`` returns the loss tensor.

    ``compile`` wraps the forward pass (normalise, flip, MAE, loss) in ``torch.compile``; AOTAutograd compiles
    its backward too. AdamW is the fused CUDA kernel on GPU.
    """

    def __init__(self, model: TorchMAE, probe: LinearProbe, *, mask_ratio: float, lr: float, weight_decay: float,
                 betas: tuple[float, float], probe_lr: float, bf16: bool, compile: bool, hflip: bool = True):
        self.model = model
        self.probe = probe
        self.mask_ratio = mask_ratio
        self.hflip = hflip
        device = next(model.parameters()).device
        self.device = device
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(decay_param_groups(model, weight_decay), lr=lr, betas=betas,
                                           fused=fused)
        self.probe_optimizer = torch.optim.Adam(probe.parameters(), lr=probe_lr, fused=fused)
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.mean = torch.tensor(IMAGENET_MEAN, device=device)
        self.std = torch.tensor(IMAGENET_STD, device=device)
        self._forward: Callable[..., MAEOutput] = torch.compile(self.forward) if compile else self.forward

    def forward(self, images_u8: torch.Tensor, flip: torch.Tensor, noise: torch.Tensor) -> MAEOutput:
        """The differentiated part: uint8 → normalised float32, optional flip, MAE loss (bf16 autocast)."""
        x = (images_u8.float() / 255.0 - self.mean) / self.std
        if self.hflip:
            x = torch.where(flip[:, None, None, None], x.flip(2), x)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            return self.model(x, noise, self.mask_ratio)

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = images_u8.shape
        num_patches = (h // self.model.patch) * (w // self.model.patch)
        flip = torch.rand(b, device=self.device) < 0.5
        noise = torch.rand(b, num_patches, device=self.device)
        out = self._forward(images_u8, flip, noise)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        probe_loss = F.cross_entropy(self.probe(out.features.detach().float()), labels)
        probe_loss.backward()
        self.probe_optimizer.step()
        self.probe_optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_pretrain_step(model_settings: dict[str, Any], *, resolution: int, batch: int, num_classes: int,
                          mask_ratio: float, lr: float, weight_decay: float, betas: tuple[float, float],
                          probe_lr: float, hflip: bool, compile: bool, steps: int, warmup_steps: int,
                          seed: int = 0) -> dict[str, Any]:
    """Times the reference's step on synthetic uint8 batches already on the GPU (else the CPU), as ours is timed
    (dailymae_jax.train.benchmark): ``warmup_steps`` untimed steps, then each of ``steps`` alone, blocking, with
    batches rotating among a few. ``model_settings`` is the architecture as plain values (width, depth, heads,
    patch, mlp_ratio, decoder_width, decoder_depth, decoder_heads, norm_pix_loss, and dtype: bf16 autocast for
    "bfloat16"). Returns the measurement's record (step times, images per second, peak memory on GPU)."""
    from dailymae_jax.train.benchmark import SYNTHETIC_BATCHES, finite_or_none, step_stats, time_steps
    from dailymae_jax.train.compile import peak_bf16_flops

    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    # float32 matrix products (outside autocast) may use TF32, as JAX's default precision does on GPU.
    torch.set_float32_matmul_precision("high")
    model = TorchMAE(resolution=resolution, **{k: v for k, v in model_settings.items() if k != "dtype"}).to(device)
    probe = LinearProbe(model_settings["width"], num_classes).to(device)
    step = TorchPretrainStep(model, probe, mask_ratio=mask_ratio, lr=lr, weight_decay=weight_decay, betas=betas,
                             probe_lr=probe_lr, bf16=model_settings["dtype"] == "bfloat16", compile=compile,
                             hflip=hflip)
    batches = [(torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8, device=device),
                torch.randint(0, num_classes, (batch,), device=device)) for _ in range(SYNTHETIC_BATCHES)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    holder = {}

    def run_step(i: int) -> None:
        holder["loss"] = step(*batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()

    times, warmup_seconds = time_steps(run_step, warmup_steps, steps)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    return {"framework": "torch", "data": "synthetic", "resolution": resolution, "batch_size": batch,
            "steps": steps, "device_kind": name, "platform": device.type, **step_stats(times, batch),
            "warmup_seconds": warmup_seconds, "torch_compile": compile,
            "final_loss": finite_or_none(float(holder["loss"])),
            "peak_bf16_flops": peak_bf16_flops(name) if cuda else None,
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "parameters": parameter_count(model)}
