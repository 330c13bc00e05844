"""Where finetuning and linear probing start: our pretraining workdir, a PyTorch checkpoint file, or scratch.

``config.init.source``:

* ``pretrain``: the latest (or ``init.step``) orbax checkpoint in ``init.workdir``, a run of the pretrain task.
  Only the MAE's parameters are read (not its optimizer state); the decoder and mask token are dropped.
* ``file``: a PyTorch checkpoint at ``init.path`` (``.pth``/``.safetensors``) in layout ``init.format``
  (``mae``: the official MAE pretraining checkpoint ``{'model': ...}``; ``timm``: a timm VisionTransformer
  state dict), read by ``dailymae_jax.pretrained.load_encoder_weights`` (which refuses a learned position
  table our fixed sin-cos model could not use, and names any missing or mis-shaped key).
* ``scratch``: random initialisation (a baseline, and the tests' shortcut).

The encoder's parameters replace the freshly initialised ones of the same name (patch embedding, cls token,
blocks, and the final ``norm`` when the classifier uses it); the head and ``fc_norm`` stay fresh, as in MAE's
finetuning. Position tables need no interpolation for our checkpoints: they are computed for each grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from dailymae_jax.config import ConfigError, checkpoint_steps
from dailymae_jax.model.mae import encoder_params

log = logging.getLogger(__name__)

SOURCES = ("pretrain", "file", "scratch")
PyTree = Any


class PretrainedError(ConfigError):
    """A pretrained source that cannot be used; the message is one line naming the config key."""


def _import_pytorch_file(params: PyTree, path: str | Path, image_size: int) -> PyTree:
    """The classifier's ``params`` with the encoder of a .pth/.safetensors (MAE or timm layout) loaded in."""
    from dailymae_jax import pretrained

    try:
        return pretrained.load_encoder_weights(params, path, image_size=image_size)
    except (KeyError, ValueError) as error:
        raise PretrainedError(f"init.path {path}: {error}") from None


# init.format → function(params, path, image_size) returning the classifier's params with the encoder
# loaded. Both layouts go through the same reader, which recognises the key names.
FILE_IMPORTERS: dict[str, Callable[[PyTree, str | Path, int], PyTree]] = {
    "mae": _import_pytorch_file,
    "timm": _import_pytorch_file,
}


def restore_pretrain_params(workdir: str | Path, step: int | None = None) -> PyTree:
    """The MAE parameters (numpy, host memory) of a pretraining workdir's checkpoint; nothing else is read."""
    directory = Path(workdir).resolve() / "checkpoints"
    steps = checkpoint_steps(workdir)
    if not steps:
        raise PretrainedError(f"init.workdir: no checkpoint in {directory}; run the pretrain task there first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise PretrainedError(f"init.step: no checkpoint {step} in {directory}; available: {steps}")
    state_dir = directory / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that the item folder lacks the step's metadata file
    try:
        tree = checkpointer.metadata(state_dir).item_metadata.tree
    finally:
        absl_log.setLevel(level)
    if "params" not in tree:
        raise PretrainedError(f"init.workdir: {state_dir} holds no 'params' (keys: {sorted(tree)})")
    params_meta = tree["params"]
    as_numpy = lambda _: ocp.RestoreArgs(restore_type=np.ndarray)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": params_meta}, partial_restore=True,
        restore_args={"params": _map_leaves(as_numpy, params_meta)}))
    log.info("read the MAE parameters of %s (step %d)", directory.parent, step)
    return restored["params"]


def _map_leaves(fn: Callable[[Any], Any], tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict({k: fn(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()})


def load_encoder(init: ml_collections.ConfigDict) -> PyTree | None:
    """The encoder params of a pretraining workdir named by ``config.init`` (None for ``scratch``; files are
    loaded straight into the classifier by ``init_from_pretrained``)."""
    if init.source == "scratch":
        return None
    if init.source == "pretrain":
        if not init.workdir:
            raise PretrainedError("init.workdir: missing; give the workdir of a pretraining run")
        return encoder_params(restore_pretrain_params(init.workdir, init.get("step")))
    raise PretrainedError(f"init.source {init.source!r}; allowed: {', '.join(SOURCES)}")


def merge_encoder(fresh: PyTree, encoder: PyTree, *, keep_fresh: tuple[str, ...] = ("head", "fc_norm")
                  ) -> tuple[PyTree, dict[str, list[str]]]:
    """``fresh`` with every leaf that ``encoder`` also has replaced by the encoder's value.

    Top-level names in ``keep_fresh`` are never replaced (the classifier's own head). Raises
    PretrainedError naming the first leaf whose shape differs (e.g. a different model size). Returns the
    params and a report: which fresh leaves were loaded, which stayed fresh, which encoder leaves were unused.
    """
    fresh_flat = traverse_util.flatten_dict(dict(fresh))
    encoder_flat = traverse_util.flatten_dict(dict(encoder))
    merged, loaded, kept = {}, [], []
    for path, value in fresh_flat.items():
        name = "/".join(path)
        if path[0] in keep_fresh or path not in encoder_flat:
            merged[path] = value
            kept.append(name)
            continue
        source = np.asarray(encoder_flat[path])
        if source.shape != tuple(value.shape):
            raise PretrainedError(f"init: pretrained {name} has shape {source.shape}, the model expects "
                                  f"{tuple(value.shape)}; set model.size/width/depth/heads/patch to the "
                                  "pretrained encoder's")
        merged[path] = source.astype(value.dtype)
        loaded.append(name)
    unused = ["/".join(p) for p in encoder_flat if p not in fresh_flat or p[0] in keep_fresh]
    missing_blocks = [n for n in kept if n.startswith(("blocks_", "patch_embed", "cls_token"))]
    if missing_blocks:
        raise PretrainedError(f"init: the pretrained encoder lacks {missing_blocks[0]} (and "
                              f"{len(missing_blocks) - 1} more); is model.depth larger than the checkpoint's?")
    return traverse_util.unflatten_dict(merged), {"loaded": loaded, "fresh": kept, "unused": unused}


def init_from_pretrained(config: ml_collections.ConfigDict, params: PyTree, *,
                         keep_fresh: tuple[str, ...] = ("head", "fc_norm")) -> tuple[PyTree, dict[str, Any]]:
    """Fresh classifier ``params`` with the encoder of ``config.init`` loaded in; returns (params, report)."""
    init = config.init
    if init.source == "file":
        if init.format not in FILE_IMPORTERS:
            raise PretrainedError(f"init.format {init.format!r}; allowed: {', '.join(FILE_IMPORTERS)}")
        if not init.path or not Path(init.path).is_file():
            raise PretrainedError(f"init.path: no such file {init.path!r}")
        loaded = FILE_IMPORTERS[init.format](params, init.path, config.schedule.resolution)
        return loaded, {"source": "file", "from": str(init.path)}
    encoder = load_encoder(init)
    if encoder is None:
        return params, {"source": "scratch"}
    merged, report = merge_encoder(params, encoder, keep_fresh=keep_fresh)
    if report["unused"]:
        log.info("pretrained leaves not used by the classifier: %s", ", ".join(report["unused"]))
    where = config.init.workdir if config.init.source == "pretrain" else config.init.path
    return merged, {"source": config.init.source, "from": str(where), "loaded": len(report["loaded"]),
                    "fresh": report["fresh"], "unused": report["unused"]}
