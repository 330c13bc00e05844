"""Analytic FLOPs of the MAE pretraining step: the matrix products, counted from the architecture.

A cross-check of XLA's own count (train/compile.py ``flops_per_step``), which also includes elementwise work
and the optimizer, and a count that does not depend on a backend implementing cost analysis. FLOPs are 2 per
multiply-add.
"""

from __future__ import annotations

from typing import Any, Mapping


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """One pre-norm block's matrix products: qkv, attention scores and mix, out projection, two MLP layers."""
    hidden = int(width * mlp_ratio)
    return 2 * tokens * width * (4 * width + 2 * hidden) + 4 * tokens * tokens * width


def analytic_forward_flops(*, width: int, depth: int, patch: int, mlp_ratio: float, decoder_width: int,
                           decoder_depth: int, resolution: int, mask_ratio: float) -> float:
    """FLOPs of the matrix products in one sample's MAE forward pass.

    Elementwise work (norms, GELU, softmax, loss) is left out: it is a few percent at MAE-B sizes.
    """
    length = (resolution // patch) ** 2
    visible = 1 + int(length * (1 - mask_ratio))  # cls + kept patches
    full = 1 + length  # the decoder sees every position
    patch_dim = patch * patch * 3
    embed = 2 * length * patch_dim * width  # applied to every patch, before masking
    encoder = depth * block_flops(visible, width, mlp_ratio)
    decoder = (2 * visible * width * decoder_width + decoder_depth * block_flops(full, decoder_width, mlp_ratio)
               + 2 * full * decoder_width * patch_dim)
    return float(embed + encoder + decoder)


def analytic_step_flops(model: Mapping[str, Any], *, resolution: int, mask_ratio: float, batch: int,
                        num_classes: int, probe_on_full_image: bool = False) -> float:
    """Matrix-product FLOPs of one pretraining step of ``batch`` samples.

    ``model`` holds the architecture as plain values: width, depth, patch, mlp_ratio, decoder_width and
    decoder_depth. Backward costs twice the forward, except that the patch embedding gets no input gradient
    (images are not differentiated); the online probe adds its forward and weight gradient, and DailyMAE's
    probe on unmasked images (``probe_on_full_image``) an extra encoder pass over every patch.
    """
    kw = {k: model[k] for k in ("width", "depth", "patch", "mlp_ratio", "decoder_width", "decoder_depth")}
    forward = analytic_forward_flops(**kw, resolution=resolution, mask_ratio=mask_ratio)
    length = (resolution // model["patch"]) ** 2
    embed = 2 * length * model["patch"] ** 2 * 3 * model["width"]
    per_sample = 3 * forward - embed + 4 * model["width"] * num_classes
    if probe_on_full_image:
        per_sample += embed + model["depth"] * block_flops(1 + length, model["width"], model["mlp_ratio"])
    return float(batch * per_sample)
