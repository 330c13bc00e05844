"""dailymae_jax: MAE pretraining in JAX with FFCV crop-decode loading and progressive resolution.

  python -m dailymae_jax.main --config=configs/<recipe>.py --workdir=DIR [--config.<field>=<value> ...]

Recipes (configs/, each file's docstring gives its launch command and expected result):
  mae_b16.py    the paper's MAE ViT-B/16 pretraining on ImageNet-1K (800 epochs, palindrome schedule)
  mae_demo.py   a small pretraining on the embedded sample data, a few CPU minutes (`make demo`)
  finetune_b16.py / linprobe_b16.py    finetune / linear-probe a pretrained ViT-B/16 on ImageNet-1K
  finetune_demo.py / linprobe_demo.py  the same on the sample data from `make demo`'s run
                                       (--config.init.workdir=runs/demo)

config.task picks the task. Any config field can be overridden, e.g. --config.train.epochs=2
--config.data.train_path=train.beton. Running again with the same workdir resumes from its last checkpoint.

Exit codes: 0 done; 1 stopped on a non-finite loss, a failed checkpoint save (earlier checkpoints kept) or no
intact checkpoint to resume from;
2 bad flag, config value or dataset file (one line names it); 128+N stopped by signal N after saving a checkpoint.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import sys
from typing import Any, NoReturn

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file with a get_config(), e.g. configs/mae_demo.py; override fields with "
    "--config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary.json and exports; "
                               "an existing one is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from dailymae_jax import distributed
    from dailymae_jax.checkpoint import CheckpointDamagedError, CheckpointSaveError
    from dailymae_jax.config import CLASSIFIER_TASKS, ConfigError, check_workdir, validate
    from dailymae_jax.data.beton import BetonError
    from dailymae_jax.data.prepare import sample_files
    from dailymae_jax.guards import Interrupted, NonFiniteError

    config = _CONFIG.value
    try:
        check_workdir(_WORKDIR.value)
        validate(config)  # before any data is written or compiled
        # Every task: the sample data is built, if asked, before JAX starts threads (by process 0 only); then
        # this process joins the others, if any. The task's modules (ffcv, torch) load only once the process
        # settings are known to be valid.
        processes = distributed.start(config, build_data=lambda: _task(config.task).prepare_data(config),
                                      sample_files=sample_files(config.data,
                                                                validation=config.task in CLASSIFIER_TASKS))
        summary = _task(config.task).run(config, _WORKDIR.value)
    except ConfigError as error:
        _fail(f"config error: {error}", 2)
    except BetonError as error:
        _fail(f"data error: {error}", 2)
    except NonFiniteError as error:
        # The same command would resume from the same checkpoint with the same data and seed, and diverge again.
        _fail(f"error: {error}; nothing after it was checkpointed. Change a setting before resuming (lower "
              "train.base_lr, raise train.warmup_epochs, or use model.dtype=float32): the same command would "
              "restore the same state and repeat this", 1)
    except CheckpointSaveError as error:
        # orbax's writer threads may still hold the failed save; a normal interpreter exit can then abort
        # in C++ (std::terminate), turning a clear exit code 1 into a crash. Everything worth keeping is
        # already on disk, so leave without running finalizers.
        _fail(f"error: {error}", 1, hard=True)
    except distributed.DistributedError as error:
        # A process that could not join (or lost the others) still holds JAX's runtime client, whose exit
        # handler would print a multi-line shutdown error after the message: leave without it.
        _fail(f"error: {error}", 1, hard=True)
    except CheckpointDamagedError as error:
        _fail(f"error: {error}", 1)
    except Interrupted as error:
        _fail(str(error), error.exit_code)
    if not processes.is_main:
        return  # process 0 reports the run
    if config.task in CLASSIFIER_TASKS:
        print(f"summary: {_WORKDIR.value}/summary.json — {summary['steps']} steps, val top-1 "
              f"{summary['val_top1']:.4f} top-5 {summary['val_top5']:.4f} over {summary['val_count']} images at "
              f"{summary['val_resolution']} px (chance {summary['chance_top1']:.4f}), "
              f"{summary['compilations_during_training']} compilations during training")
        return
    print(f"summary: {_WORKDIR.value}/summary.json — {summary['steps']} steps, loss "
          f"{summary['initial_loss']:.4f} → {summary['final_loss']:.4f}, "
          f"{summary['images_per_second']:.1f} img/s, {summary['compilations_during_training']} compilations "
          "during training")
    for name, path in summary.get("exports", {}).items():
        print(f"exported {name}: {path}")
    if "reconstruction" in summary:
        print(f"reconstructions: {summary['reconstruction']}")


def _fail(message: str, exit_code: int, *, hard: bool = False) -> NoReturn:
    if not hard:
        print(message, file=sys.stderr)
        sys.exit(exit_code)
    # A hard exit skips interpreter shutdown (background threads may be stuck). Those threads can still print
    # (e.g. orbax's async saver, a traceback from its closed event loop), so the message must stay the run's
    # last line, and a line of its own:
    # - it starts with a line break: Python writes a traceback in pieces, straight through to the file (stderr
    #   is not buffered), so another thread may have left half a line there (seen under load: the message
    #   was glued to "raise RuntimeError('Event loop is closed')");
    # - file descriptors 1 and 2 are pointed at /dev/null before the message goes out through a copy of 2, so
    #   that nothing written later, by Python threads or C++, reaches the real stdout or stderr.
    logging.shutdown()
    logging.disable(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.write(stderr, ("\n" + message + "\n").encode())
    os._exit(exit_code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with bad flags, config files that do not load and unknown config keys reported in
    one line (exit code 2)."""
    _check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(f"flag error: {error}; see --help", 2)
    except (AttributeError, KeyError, TypeError) as error:  # ml_collections: an override of a missing key
        _fail(f"config error: {unknown_override(argv, error)}", 2)


def _check_config_file(argv: list[str]) -> None:
    """A --config file that is missing, does not compile or raises in get_config(): one line naming it.

    absl would report the first two as a traceback, or only when the config is first read."""
    spec = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None:
        return  # absl reports the missing flag
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        _fail(f"config error: --config: no such file {path}", 2)
    try:
        _load_config_file(spec)
    except SyntaxError as error:
        _fail(f"config error: --config {path}: {error.msg} (line {error.lineno})", 2)
    except Exception as error:  # anything get_config() or the file's top level raises
        detail = " ".join(str(error).split())
        _fail(f"config error: --config {path}: {type(error).__name__}{': ' + detail if detail else ''}", 2)


def unknown_override(argv: list[str], error: BaseException) -> str:
    """One line naming the ``--config.<key>`` override that matches no field, with the nearest fields."""
    config = None
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_file:
        with contextlib.suppress(Exception):  # a config file that fails to load has its own error
            config = _load_config_file(config_file)
    if config is not None:
        for arg in argv:
            if arg.startswith("--config.") and "=" in arg:
                missing = _missing_key(config, arg[len("--config."):].split("=", 1)[0])
                if missing is not None:
                    return missing
    return "unknown override: " + " ".join(str(error).replace("\\n", " ").split())


def _load_config_file(spec: str) -> Any:
    """``get_config()`` of ``path[:argument]``, the way --config reads it."""
    path, *argument = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("_config_for_error_message", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*argument)


def _missing_key(config: Any, key: str) -> str | None:
    node, walked = config, []
    for part in key.split("."):
        fields = list(node.keys()) if hasattr(node, "keys") else []
        if part not in fields:
            where = ".".join(walked) or "the config"
            if not fields:
                return f"--config.{key}: {where} is a value, not a group of fields"
            near = difflib.get_close_matches(part, fields, n=3)
            hint = f"; did you mean {', '.join('.'.join([*walked, n]) for n in near)}?" if near else ""
            return (f"--config.{key}: {where} has no field {part!r}{hint} "
                    f"(fields: {', '.join(sorted(fields))})")
        node, walked = node[part], [*walked, part]
    return None


def _task(name: str) -> Any:
    """The task module: ``prepare_data(config)`` (before JAX starts) and ``run(config, workdir)``."""
    from dailymae_jax.train import finetune, linprobe, pretrain

    return {"pretrain": pretrain, "finetune": finetune, "linprobe": linprobe}[name]


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
