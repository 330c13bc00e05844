"""Pretrained weights into our models: official MAE and timm checkpoints, our exports, our own runs.

Sources (any of them, wherever a function takes ``source``):

* a state dict (name → tensor or array), bare or wrapped as ``{'model': ...}`` like the official MAE files;
* a ``.pth`` or ``.safetensors`` file: an official MAE pretraining or finetuning checkpoint, a timm
  ``VisionTransformer`` state dict, or a file written by :mod:`dailymae_jax.export`;
* one of our pretraining workdirs (its latest orbax checkpoint, or the step given).

:func:`load_mae_weights` fills a whole :class:`~dailymae_jax.model.mae.MaskedAutoencoder` (encoder and decoder,
every key required). :func:`load_encoder_weights` fills the encoder of a
:class:`~dailymae_jax.model.vit.VisionTransformer` and leaves its head alone, as the official finetuning
script does: the only parameters the checkpoint may lack are ``head.*``, and ``fc_norm.*`` when the model pools
globally (the pretrained ``norm.*`` is then unused). Anything else missing, left over or of the wrong shape is
an error that names the key.

Position tables. Our models compute the 2-D sin-cos table for whatever grid they run at, so a checkpoint's
sin-cos ``pos_embed`` (all MAE pretraining checkpoints) needs no resampling: it is checked and dropped. A
checkpoint whose table was learned cannot go into a model with a fixed table (that would silently change the
network); a model that carries its table as a parameter named ``pos_embed`` (1, 1 + N, D) gets the
checkpoint's table, resampled bicubically over the grid when the resolution differs (cls row kept), as the
official MAE code does (:func:`resample_pos_embed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from dailymae_jax import export
from dailymae_jax.model.mae import DECODER_PARAM_PREFIXES, MaskedAutoencoder
from dailymae_jax.model.vit import sincos_pos_embed_2d

# How far a checkpoint's table may be from ours and still count as the sin-cos table: a float32 copy differs
# by a few ulps, a bfloat16 one by up to 2^-9 (half an ulp below 1). A learned table that close to it is
# indistinguishable from a rounded copy, and replacing it changes no more than bfloat16 storage would.
SINCOS_TOLERANCE = 4e-3


# ------------------------------------------------------------------------------------------------
# Our own runs.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PretrainedRun:
    """One checkpoint of a pretraining workdir: float32 parameters (numpy) and the model they belong to."""

    params: dict[str, Any]
    model: MaskedAutoencoder  # built from the run's config, computing in float32
    step: int
    config: dict[str, Any]

    @property
    def resolution(self) -> int:
        """The run's base resolution (``schedule.resolution``): the one exports write position tables for."""
        return int(self.config["schedule"]["resolution"])


def mae_from_config(config: Mapping[str, Any], *, dtype: Any = None) -> MaskedAutoencoder:
    """The MaskedAutoencoder a pretraining config (a dict, as saved in config.json) describes."""
    import jax.numpy as jnp
    import ml_collections

    from dailymae_jax import config as config_lib
    from dailymae_jax.model.mae import mae_from_size

    config = ml_collections.ConfigDict(dict(config))
    m = config.model
    return mae_from_size(config_lib.model_size(config), decoder_width=m.decoder_width,
                         decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                         norm_pix_loss=m.norm_pix_loss, dtype=dtype or jnp.float32)


def load_run(workdir: str | Path, step: int | None = None) -> PretrainedRun:
    """The parameters of a pretraining workdir's checkpoint (latest, or ``step``), without its data.

    The model comes from the config saved inside the checkpoint (the one the run had when it wrote it), or
    from ``config.json`` for checkpoints without one.
    """
    from dailymae_jax.checkpoint import restore_params

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    params, step, meta = restore_params(workdir, step)
    config = meta.get("config")
    if not config:
        config_file = workdir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{workdir}: the checkpoint has no config and there is no config.json")
        config = json.loads(config_file.read_text())
    params = traverse_util.unflatten_dict({k: np.asarray(v, np.float32)
                                           for k, v in traverse_util.flatten_dict(dict(params)).items()})
    return PretrainedRun(params=params, model=mae_from_config(config), step=int(step), config=config)


def read_source(source: Mapping[str, Any] | str | Path, *, step: int | None = None) -> dict[str, np.ndarray]:
    """Any supported source (see the module docstring) as one flat PyTorch-named float32 state dict."""
    if isinstance(source, Mapping):
        return export.unwrap_state_dict(source)
    path = Path(source)
    if path.is_dir():
        run = load_run(path, step)
        grid = (run.resolution // run.model.patch,) * 2
        return export.to_state_dict(run.params, fmt="mae", width=run.model.width,
                                    decoder_width=run.model.decoder_width, grid=grid)
    return export.load_state_dict(path)


# ------------------------------------------------------------------------------------------------
# Position tables.
# ------------------------------------------------------------------------------------------------

def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of bicubic interpolation, PyTorch's convention.

    ``F.interpolate(mode='bicubic', align_corners=False)`` without antialiasing: output pixel i samples the
    input at (i + 0.5)·in/out − 0.5 with the cubic convolution kernel of a = −0.75 over the 4 nearest input
    pixels, indices clamped at the borders (Keys, "Cubic convolution interpolation", 1981).
    """
    a = -0.75

    def near(x):  # |x| ≤ 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = (i + 0.5) * in_size / out_size - 0.5
        x0 = math.floor(src)
        t = src - x0
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            matrix[i, min(max(x0 + offset, 0), in_size - 1)] += weight
    return matrix


def resample_pos_embed(table: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A (1, 1 + gh·gw, D) position table with a cls row → the same for ``grid``, bicubic over the grid.

    The source grid must be square (as in every ViT checkpoint of MAE and timm at a square resolution). The cls
    row is kept as is; the patch rows are resampled as an image of D channels, like the official MAE finetuning
    code (PyTorch bicubic, no antialiasing when shrinking). Computed in float64, returned as float32.
    """
    table = np.asarray(table)
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"pos_embed: expected shape (1, 1 + N, D), got {table.shape}")
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise ValueError(f"pos_embed: {table.shape[1] - 1} patch rows do not form a square grid")
    if (side, side) == tuple(grid):
        return table.astype(np.float32)
    patches = table[0, 1:].astype(np.float64).reshape(side, side, -1)
    rows, cols = _cubic_weights(side, grid[0]), _cubic_weights(side, grid[1])
    resampled = np.einsum("ih,jw,hwd->ijd", rows, cols, patches).reshape(grid[0] * grid[1], -1)
    return np.concatenate([table[:, :1].astype(np.float64), resampled[None]], axis=1).astype(np.float32)


def _check_sincos(key: str, table: np.ndarray) -> None:
    """Refuses a learned table: our model would replace it with its own sin-cos table."""
    side = math.isqrt(table.shape[1] - 1) if table.ndim == 3 else 0
    if table.ndim != 3 or table.shape[0] != 1 or side * side != table.shape[1] - 1:
        raise ValueError(f"{key}: expected shape (1, 1 + N, D) over a square grid, got {table.shape}")
    fixed = sincos_pos_embed_2d(table.shape[2], side, side, cls_token=True)[None]
    error = float(np.max(np.abs(table - fixed)))
    if error > SINCOS_TOLERANCE:
        raise ValueError(f"{key}: the checkpoint's position table is learned (max |difference| {error:.3g} from "
                         "the 2-D sin-cos table); this model computes a fixed sin-cos table and cannot hold it")


# ------------------------------------------------------------------------------------------------
# Filling a model's parameters.
# ------------------------------------------------------------------------------------------------

def _fill(params: Mapping[str, Any], state: Mapping[str, np.ndarray], *, keep: set[tuple[str, ...]],
          ignore: set[str], what: str) -> dict[str, Any]:
    """Our ``params`` with every leaf not in ``keep`` taken from ``state`` (PyTorch names, converted).

    Keys of ``state`` listed in ``ignore`` (or under those prefixes, given with a trailing dot) are skipped;
    any other key the model lacks is unexpected. Leaves keep their dtype.
    """
    target = traverse_util.flatten_dict(dict(params))
    converted = {}
    for key, value in state.items():
        if key in ignore or any(key.startswith(p) for p in ignore if p.endswith(".")):
            continue
        path, converted_value = export.flax_leaf(export.flax_path(key), value)
        if path not in target:
            raise ValueError(f"{what}: unexpected key {key} {tuple(np.shape(value))}: the model has no such "
                             "parameter (a different depth, or not this kind of checkpoint?)")
        converted[path] = converted_value
    filled = {}
    for path, leaf in target.items():
        if path in keep:
            filled[path] = leaf
            continue
        torch_name = export.torch_key(path)
        expected = export.torch_shape(path, tuple(leaf.shape))
        if path not in converted:
            raise ValueError(f"{what}: missing key {torch_name} {expected}")
        value = converted[path]
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{what}: {torch_name} has shape {export.torch_shape(path, value.shape)} in the "
                             f"checkpoint, the model expects {expected}")
        filled[path] = value.astype(leaf.dtype)
    return traverse_util.unflatten_dict(filled)


def _decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PARAM_PREFIXES)


def load_encoder_weights(params: Mapping[str, Any], source: Mapping[str, Any] | str | Path, *,
                         image_size: int | tuple[int, int], load_head: bool = False,
                         step: int | None = None) -> dict[str, Any]:
    """A VisionTransformer's ``params`` with the encoder taken from a pretrained ``source``.

    ``params`` are the model's own initialised parameters; they say which layout to fill (``norm`` or
    ``fc_norm``, a head or not), and the parameters not taken from the checkpoint keep their values. The head
    (``head.*``) is kept unless ``load_head``, and ``fc_norm.*`` is kept when the checkpoint has none (a
    pretraining checkpoint). A decoder in the checkpoint is ignored. ``image_size`` is the resolution the
    model will run at: it sets the grid a learned ``pos_embed`` parameter is resampled to. ``step`` picks a
    checkpoint when ``source`` is a workdir.
    """
    state = read_source(source, step=step)
    target = traverse_util.flatten_dict(dict(params))
    keep = {path for path in target if path[0] == "head"} if not load_head else set()
    if ("fc_norm", "scale") in target and "fc_norm.weight" not in state:
        keep |= {path for path in target if path[0] == "fc_norm"}
    ignore = {key for key in state if _decoder_key(key)} | {"pos_embed"}
    if ("norm", "scale") not in target:  # a globally pooled head replaces the final norm
        ignore.add("norm.")
    if not load_head:
        ignore.add("head.")
    keep |= {path for path in target if path[0] == "pos_embed"}
    filled = _fill(params, state, keep=keep, ignore=ignore, what="encoder checkpoint")
    return _fill_pos_embed(filled, state, image_size=image_size)


def _fill_pos_embed(params: dict[str, Any], state: Mapping[str, np.ndarray], *,
                    image_size: int | tuple[int, int]) -> dict[str, Any]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    patch = int(params["patch_embed"]["proj"]["kernel"].shape[0])
    if height % patch or width % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    has_table = "pos_embed" in params
    if "pos_embed" not in state:
        if has_table:
            raise ValueError(f"encoder checkpoint: missing key pos_embed {tuple(params['pos_embed'].shape)}")
        return params
    if not has_table:
        _check_sincos("pos_embed", state["pos_embed"])
        return params
    table = resample_pos_embed(state["pos_embed"], (height // patch, width // patch))
    leaf = params["pos_embed"]
    if table.shape != tuple(leaf.shape):
        raise ValueError(f"encoder checkpoint: pos_embed resampled to {table.shape}, the model expects "
                         f"{tuple(leaf.shape)} at image_size {image_size}")
    return {**params, "pos_embed": table.astype(leaf.dtype)}


def load_mae_weights(params: Mapping[str, Any], source: Mapping[str, Any] | str | Path, *,
                     step: int | None = None) -> dict[str, Any]:
    """A MaskedAutoencoder's ``params`` (or their shapes) filled from an MAE pretraining ``source``.

    Every encoder and decoder parameter must be in the checkpoint with the model's shape. Both position tables
    must be the fixed sin-cos ones (as in MAE pretraining): our model computes them for any grid.
    """
    state = read_source(source, step=step)
    for key in export.POSITION_TABLES:
        if key in state:
            _check_sincos(key, state[key])
    return _fill(params, state, keep=set(), ignore=set(export.POSITION_TABLES), what="MAE checkpoint")
