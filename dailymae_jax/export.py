"""Flax parameters ↔ PyTorch state dicts: the official MAE pretraining layout and timm's VisionTransformer.

The mapping is mechanical because our module names follow timm's: ``blocks_3/attn/qkv/kernel`` ↔
``blocks.3.attn.qkv.weight``. Dense kernels (in, out) become weights (out, in); the patch-embedding conv
kernel (p, p, 3, D) becomes (D, 3, p, p); LayerNorm ``scale`` becomes ``weight``. The fixed sin-cos position
tables, which are constants in our model, are written out for the export resolution (``pos_embed`` and
``decoder_pos_embed``, with the zero cls row) because PyTorch code expects them as tensors.

Files: ``.safetensors`` (needs no torch) or ``.pth`` (plain tensors, ``torch.load(weights_only=True)``).
The ``mae`` format wraps the state dict as ``{'model': state_dict}`` like the official checkpoints.
A reference batch (:func:`reference_batch`) records what the JAX model computes, to check an export with.
The reverse direction, checking a checkpoint against a model and loading it, is :mod:`dailymae_jax.pretrained`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from dailymae_jax import files
from dailymae_jax.model.mae import encoder_params
from dailymae_jax.model.vit import sincos_pos_embed_2d

FORMATS = ("mae", "timm")
POSITION_TABLES = ("pos_embed", "decoder_pos_embed")
_NUMBERED = re.compile(r"^(blocks|decoder_blocks)_(\d+)$")


def torch_key(path: tuple[str, ...]) -> str:
    """Our parameter path → its PyTorch name, e.g. ``blocks_3/attn/qkv/kernel`` → ``blocks.3.attn.qkv.weight``."""
    parts = [_NUMBERED.sub(r"\1.\2", part) for part in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _torch_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return np.array(value, dtype=np.float32, order="C")  # a writable copy: torch.from_numpy wants one


def to_state_dict(params: Mapping[str, Any], *, fmt: str, width: int, decoder_width: int | None,
                  grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Flax MAE params → flat PyTorch-named numpy arrays (float32) in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    tree = params if fmt == "mae" else encoder_params(params)
    flat = traverse_util.flatten_dict(dict(tree))
    state = {torch_key(path): _torch_value(path, np.asarray(value)) for path, value in flat.items()}
    state["pos_embed"] = sincos_pos_embed_2d(width, *grid, cls_token=True)[None].astype(np.float32)
    if fmt == "mae":
        state["decoder_pos_embed"] = sincos_pos_embed_2d(decoder_width, *grid, cls_token=True)[None].astype(
            np.float32)
    return dict(sorted(state.items()))


def flax_path(key: str) -> tuple[str, ...]:
    """A PyTorch key → our parameter path, e.g. ``blocks.3.attn.qkv.weight`` → ``blocks_3/attn/qkv/weight``.

    The last element stays ``weight``; :func:`flax_leaf` decides between ``kernel`` and ``scale``.
    """
    merged: list[str] = []
    for part in key.split("."):  # "blocks" "3" → "blocks_3"
        if merged and part.isdigit() and merged[-1] in ("blocks", "decoder_blocks"):
            merged[-1] = f"{merged[-1]}_{part}"
        else:
            merged.append(part)
    return tuple(merged)


def flax_leaf(path: tuple[str, ...], value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """The inverse of the export's layout change: weight → kernel (transposed) or LayerNorm scale."""
    value = np.asarray(value, dtype=np.float32)
    if path[-1] == "weight":
        if value.ndim == 1:
            path = path[:-1] + ("scale",)
        else:
            path = path[:-1] + ("kernel",)
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return path, np.ascontiguousarray(value)


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of one of our parameters (for error messages in the checkpoint's own terms)."""
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))
    return tuple(shape)


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The flat name → float32 array dict inside a checkpoint object.

    Accepts a bare state dict, the official MAE wrapping ``{'model': ...}`` (with or without the optimizer,
    epoch and args that training checkpoints add), timm training checkpoints' ``{'state_dict': ...}``, and the
    ``module.`` prefix that DistributedDataParallel leaves on every key. Values may be torch tensors (any float
    dtype) or numpy arrays.
    """
    for wrapper in ("model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"state dict key {key!r} ({type(key).__name__}) is not a parameter name")
        if key.endswith(".num_batches_tracked"):  # BatchNorm's integer step counter (linear-probe heads): no weight
            continue
        if hasattr(value, "detach"):  # a torch tensor; float() first, numpy has no bfloat16
            if not value.is_floating_point():
                raise ValueError(f"state dict entry {key!r} holds {value.dtype} values; weights must be floats")
            value = value.detach().float().cpu().numpy()
        if not isinstance(value, np.ndarray):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"state dict entry {key!r} holds {value.dtype} values; weights must be floats")
        state[key] = value.astype(np.float32, copy=False)
        check_finite(key, state[key])
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def check_finite(key: str, value: np.ndarray) -> None:
    """Refuses weights holding NaN or infinity (``error > tol`` comparisons would let them through)."""
    bad = value.size - int(np.count_nonzero(np.isfinite(value)))
    if bad:
        raise ValueError(f"state dict entry {key!r} holds {bad} non-finite value{'s' if bad > 1 else ''} "
                         "(NaN or infinity)")


def save_state_dict(state: dict[str, np.ndarray], path: str | Path, *, fmt: str) -> Path:
    """Writes ``.safetensors`` or ``.pth``; the ``mae`` format's .pth is ``{'model': state}``. Every tensor is
    checked (a float tensor, finite) before anything is written."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"export file {path}: the name must end in .pth or .safetensors")
    for key, value in state.items():
        if not isinstance(key, str) or not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise ValueError(f"export entry {key!r}: needs a name and a float tensor")
        check_finite(key, np.asarray(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file(state, str(tmp), metadata={"format": fmt, "layout": "pytorch"})
        else:
            import torch
            tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
            torch.save({"model": tensors} if fmt == "mae" else tensors, tmp)
    return path


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a file written by ``save_state_dict``, an official MAE checkpoint or a timm one, as numpy arrays.

    ``.pth`` files are read with ``torch.load(weights_only=True)``, which runs no pickled code; the
    ``argparse.Namespace`` that MAE training checkpoints carry under ``args`` is allowed as well.

    Every error is a ValueError (FileNotFoundError for a missing file) of one line naming the file and the
    reason: what torch or safetensors raised, shortened, or the entry that is not a finite float tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        obj = _read_checkpoint_file(path)
    except Exception as error:  # torch and safetensors raise many types (UnpicklingError, RuntimeError, ...)
        raise ValueError(f"checkpoint file {path}: cannot be read ({_read_failure(error)})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint file {path} holds a {type(obj).__name__}, not a state dict")
    try:
        return unwrap_state_dict(obj)
    except ValueError as error:
        raise ValueError(f"checkpoint file {path}: {error}") from None


def _read_checkpoint_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    import argparse

    import torch
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_failure(error: BaseException) -> str:
    """torch's or safetensors' reason in a few words. torch's refusal of pickled objects is named by the object's
    type: its advice to load with weights_only=False would run whatever code the file carries."""
    text = " ".join(str(error).split())
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"it holds a pickled {refused.group(1)} object; only tensors, numbers and containers are read, "
                "no pickled code is run")
    if "weights_only" in text:
        return f"{type(error).__name__}: not a weights-only PyTorch file"
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def export_run(params: Mapping[str, Any], model: Any, out_dir: str | Path, *, formats: tuple[str, ...],
               resolution: int, suffixes: tuple[str, ...] = (".pth", ".safetensors")) -> dict[str, Path]:
    """Exports an MAE's params in each format and file type; returns {'mae.pth': path, ...}."""
    grid = (resolution // model.patch, resolution // model.patch)
    written = {}
    for fmt in formats:
        state = to_state_dict(params, fmt=fmt, width=model.width, decoder_width=model.decoder_width, grid=grid)
        for suffix in suffixes:
            written[f"{fmt}{suffix}"] = save_state_dict(state, Path(out_dir) / f"{fmt}{suffix}", fmt=fmt)
    return written


# ------------------------------------------------------------------------------------------------
# A reference batch, so that anyone can check an export against the JAX model that wrote it.
# ------------------------------------------------------------------------------------------------

def reference_images(count: int, size: int) -> np.ndarray:
    """uint8 (count, size, size, 3): centre squares of the sample photographs, resized (bicubic).

    Real pictures that every install with the ``sample`` extra has on disk (scikit-image, scikit-learn and
    matplotlib ship them), so a reference batch needs no dataset.
    """
    from PIL import Image

    from dailymae_jax.data.sample import source_photograph_paths

    paths = list(source_photograph_paths().values())
    if not 1 <= count <= len(paths):
        raise ValueError(f"reference batch size {count}; allowed: 1 to {len(paths)} (one per sample photograph)")
    images = []
    for path in paths[:count]:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        images.append(np.asarray(square.resize((size, size), Image.BICUBIC)))
    return np.stack(images)


def reference_batch(params: Mapping[str, Any], model: Any, images: np.ndarray, *, mask_ratio: float,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """What the JAX model computes on ``images`` (uint8 N×H×W×3), in float32, for checking an export.

    Keys: ``images``; ``noise`` (N, L) float32, the masking noise (the ``int(L·(1 − mask_ratio))`` patches with
    the smallest noise are kept, ties broken by position); ``mask`` (N, L), 1 = removed; ``mask_ratio``;
    ``loss``, the MAE loss of that masked pass (mean squared error on the removed patches, targets normalised
    per patch when ``norm_pix_loss``); ``pred`` (N, L, p·p·3), the decoder's predictions for every patch,
    patches row-major and each flattened as (row, column, channel); ``features_cls`` and ``features_mean``
    (N, D), the encoder's cls token and mean patch token after the final norm on the full, unmasked images;
    ``pixel_mean`` and ``pixel_std``: the model sees (images / 255 − mean) / std; ``norm_pix_loss``.
    """
    import jax
    import jax.numpy as jnp

    from dailymae_jax.augment import IMAGENET_MEAN, IMAGENET_STD, normalize

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"reference images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    noise = jax.random.uniform(jax.random.PRNGKey(seed), (n, (h // model.patch) * (w // model.patch)),
                               jnp.float32)

    @jax.jit
    def compute(params, images, noise):
        x = normalize(images)
        out = model.apply({"params": params}, x, noise, mask_ratio)
        tokens = model.apply({"params": params}, x, method=model.encode)
        return out.loss, out.pred, out.mask, tokens[:, 0], tokens[:, 1:].mean(axis=1)

    loss, pred, mask, cls, mean = jax.device_get(compute(params, images, noise))
    return {"images": images, "noise": np.asarray(noise), "mask": mask.astype(np.float32),
            "mask_ratio": np.float32(mask_ratio), "loss": np.float32(loss), "pred": pred.astype(np.float32),
            "features_cls": cls.astype(np.float32), "features_mean": mean.astype(np.float32),
            "pixel_mean": np.asarray(IMAGENET_MEAN, np.float32), "pixel_std": np.asarray(IMAGENET_STD, np.float32),
            "norm_pix_loss": np.bool_(model.norm_pix_loss)}


def save_reference_batch(batch: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Writes the batch as an uncompressed ``.npz`` (numpy only, no pickles)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference batch file {path}: the name must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as tmp, open(tmp, "wb") as file:  # a file object: savez adds no suffix
        np.savez(file, **batch)
    return path
