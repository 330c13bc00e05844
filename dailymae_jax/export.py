"""Flax parameters ↔ PyTorch state dicts: the official MAE pretraining layout and timm's VisionTransformer.

The mapping is mechanical because our module names follow timm's: ``blocks_3/attn/qkv/kernel`` ↔
``blocks.3.attn.qkv.weight``. Dense kernels (in, out) become weights (out, in); the patch-embedding conv
kernel (p, p, 3, D) becomes (D, 3, p, p); LayerNorm ``scale`` becomes ``weight``. The fixed sin-cos position
tables, which are constants in our model, are written out for the export resolution (``pos_embed`` and
``decoder_pos_embed``, with the zero cls row) because PyTorch code expects them as tensors.

Files: ``.safetensors`` (needs no torch) or ``.pth`` (plain tensors, ``torch.load(weights_only=True)``).
The ``mae`` format wraps the state dict as ``{'model': state_dict}`` like the official checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from dailymae_jax.model.mae import encoder_params
from dailymae_jax.model.vit import sincos_pos_embed_2d

FORMATS = ("mae", "timm")
_NUMBERED = re.compile(r"^(blocks|decoder_blocks)_(\d+)$")


def _torch_key(path: tuple[str, ...]) -> str:
    parts = [_NUMBERED.sub(r"\1.\2", part) for part in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _torch_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def to_state_dict(params: Mapping[str, Any], *, fmt: str, width: int, decoder_width: int | None,
                  grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Flax MAE params → flat PyTorch-named numpy arrays (float32) in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    tree = params if fmt == "mae" else encoder_params(params)
    flat = traverse_util.flatten_dict(dict(tree))
    state = {_torch_key(path): _torch_value(path, np.asarray(value)) for path, value in flat.items()}
    state["pos_embed"] = sincos_pos_embed_2d(width, *grid, cls_token=True)[None].astype(np.float32)
    if fmt == "mae":
        state["decoder_pos_embed"] = sincos_pos_embed_2d(decoder_width, *grid, cls_token=True)[None].astype(
            np.float32)
    return dict(sorted(state.items()))


def from_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """PyTorch-named arrays (either format, or ``{'model': ...}``) → nested Flax params.

    Position tables are dropped: ours are computed exactly for whatever grid the model runs at.
    Classification heads (``head.*``, ``fc_norm.*``) are kept under the same names.
    """
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    flat = {}
    for key, value in state.items():
        if key in ("pos_embed", "decoder_pos_embed"):
            continue
        parts = key.split(".")
        merged: list[str] = []
        for part in parts:  # "blocks" "3" → "blocks_3"
            if merged and part.isdigit() and merged[-1] in ("blocks", "decoder_blocks"):
                merged[-1] = f"{merged[-1]}_{part}"
            else:
                merged.append(part)
        value = np.asarray(value, dtype=np.float32)
        if merged[-1] == "weight":
            if value.ndim == 1:
                merged[-1] = "scale"  # LayerNorm
            else:
                merged[-1] = "kernel"
                value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        flat[tuple(merged)] = np.ascontiguousarray(value)
    return traverse_util.unflatten_dict(flat)


def save_state_dict(state: dict[str, np.ndarray], path: str | Path, *, fmt: str) -> Path:
    """Writes ``.safetensors`` or ``.pth``; the ``mae`` format's .pth is ``{'model': state}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file(state, str(tmp), metadata={"format": fmt, "layout": "pytorch"})
    elif path.suffix == ".pth":
        import torch
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
        torch.save({"model": tensors} if fmt == "mae" else tensors, tmp)
    else:
        raise ValueError(f"export file {path}: the name must end in .pth or .safetensors")
    tmp.replace(path)
    return path


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a file written by ``save_state_dict`` (or an official checkpoint) as numpy arrays."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    return {k: v.float().numpy() for k, v in state.items()}


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
