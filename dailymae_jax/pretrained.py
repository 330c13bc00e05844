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
checkpoint whose table was learned cannot go into our models (that would silently change the network).

Finetuning and linear probing start through :func:`init_from_pretrained`, which reads ``config.init`` and
goes through the same readers: a pretraining workdir (its checkpoint, read by
:func:`dailymae_jax.checkpoint.restore_params`) or a PyTorch file, or nothing (``scratch``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dailymae_jax import export
from dailymae_jax.config import INIT_FORMATS, INIT_SOURCES
from dailymae_jax.errors import ConfigError
from dailymae_jax.model.build import mae_from_config
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
    return PretrainedRun(params=params, model=mae_from_config(config, dtype=jnp.float32), step=int(step),
                         config=config)


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

def _ignored(key: str, ignore: set[str]) -> bool:
    """Whether ``key`` is in ``ignore`` or under one of its prefixes (given with a trailing dot)."""
    return key in ignore or any(key.startswith(p) for p in ignore if p.endswith("."))


def _fill(params: Mapping[str, Any], state: Mapping[str, np.ndarray], *, keep: set[tuple[str, ...]],
          ignore: set[str], what: str) -> dict[str, Any]:
    """Our ``params`` with every leaf not in ``keep`` taken from ``state`` (PyTorch names, converted).

    Keys of ``state`` listed in ``ignore`` (or under those prefixes, given with a trailing dot) are skipped;
    any other key the model lacks is unexpected. Leaves keep their dtype.
    """
    target = traverse_util.flatten_dict(dict(params))
    converted = {}
    for key, value in state.items():
        if _ignored(key, ignore):
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


def fill_encoder(params: Mapping[str, Any], state: Mapping[str, np.ndarray], *, load_head: bool = False
                 ) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A VisionTransformer's ``params`` with the encoder taken from a PyTorch-named ``state``, and a report.

    The head (``head.*``) is kept unless ``load_head``, and ``fc_norm.*`` is kept when the checkpoint has none
    (a pretraining checkpoint); a globally pooled model has no ``norm`` and ignores the checkpoint's. The
    report lists the parameters ``loaded`` and kept ``fresh`` (our names), and the checkpoint keys ``unused``.
    """
    target = traverse_util.flatten_dict(dict(params))
    keep = {path for path in target if path[0] == "head"} if not load_head else set()
    if ("fc_norm", "scale") in target and "fc_norm.weight" not in state:
        keep |= {path for path in target if path[0] == "fc_norm"}
    ignore = {key for key in state if key.startswith(DECODER_PARAM_PREFIXES)} | {"pos_embed"}
    if ("norm", "scale") not in target:  # a globally pooled head replaces the final norm
        ignore.add("norm.")
    if not load_head:
        ignore.add("head.")
    if "pos_embed" in state:
        _check_sincos("pos_embed", state["pos_embed"])
    filled = _fill(params, state, keep=keep, ignore=ignore, what="encoder checkpoint")
    report = {"loaded": ["/".join(p) for p in target if p not in keep],
              "fresh": ["/".join(p) for p in target if p in keep],
              "unused": sorted(key for key in state if _ignored(key, ignore))}
    return filled, report


def load_encoder_weights(params: Mapping[str, Any], source: Mapping[str, Any] | str | Path, *,
                         load_head: bool = False, step: int | None = None) -> dict[str, Any]:
    """A VisionTransformer's ``params`` with the encoder taken from a pretrained ``source`` (see
    :func:`fill_encoder`).

    ``params`` are the model's own initialised parameters; they say which layout to fill (``norm`` or
    ``fc_norm``, a head or not), and the parameters not taken from the checkpoint keep their values. ``step``
    picks a checkpoint when ``source`` is a workdir.
    """
    return fill_encoder(params, read_source(source, step=step), load_head=load_head)[0]


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


# ------------------------------------------------------------------------------------------------
# Where finetuning and linear probing start (config.init).
# ------------------------------------------------------------------------------------------------

class PretrainedError(ConfigError):
    """A pretrained source that cannot be used; the message is one line naming the config key."""


def init_from_pretrained(config: Any, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A classifier's fresh ``params`` with the encoder named by ``config.init`` loaded in; (params, report).

    ``init.source``: ``pretrain`` reads the latest (or ``init.step``) checkpoint of the pretraining workdir
    ``init.workdir``; ``file`` reads the PyTorch checkpoint ``init.path`` (``.pth``/``.safetensors``, layout
    ``init.format``: ``mae`` or ``timm``); ``scratch`` keeps the random initialisation. The head and a
    globally pooled model's ``fc_norm`` stay fresh, as in MAE's finetuning; a linear probe's encoder (no head)
    keeps the pretrained final norm.
    """
    init = config.init
    if init.source == "scratch":
        return dict(params), {"source": "scratch"}
    if init.source == "pretrain":
        key, where = "init.workdir", init.workdir
        if not where:
            raise PretrainedError("init.workdir: missing; give the workdir of a pretraining run")
        step = init.get("step")
        try:
            state = read_source(Path(where), step=step)
        except FileNotFoundError as error:
            key = "init.step" if step is not None and "no checkpoint for step" in str(error) else key
            raise PretrainedError(f"{key}: {error}") from None
    elif init.source == "file":
        key, where = "init.path", init.path
        if init.format not in INIT_FORMATS:
            raise PretrainedError(f"init.format {init.format!r}; allowed: {', '.join(INIT_FORMATS)}")
        if not where or not Path(where).is_file():
            raise PretrainedError(f"init.path: no such file {where!r}")
        try:
            state = read_source(Path(where))
        except (KeyError, ValueError) as error:
            raise PretrainedError(f"init.path: {error}") from None  # the error names the file
    else:
        raise PretrainedError(f"init.source {init.source!r}; allowed: {', '.join(INIT_SOURCES)}")
    try:
        filled, report = fill_encoder(params, state)
    except (KeyError, ValueError) as error:
        raise PretrainedError(f"{key} {where}: {error} (model.size/width/depth/heads/patch must be the pretrained "
                              "encoder's)") from None
    if report["unused"]:
        logging.getLogger(__name__).info("pretrained keys not used by the classifier: %s",
                                         ", ".join(report["unused"]))
    return filled, {"source": init.source, "from": str(where), "loaded": len(report["loaded"]),
                    "fresh": report["fresh"], "unused": report["unused"]}
