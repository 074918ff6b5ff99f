"""One distillation run without Ray (:func:`run`), the library under ``kdtune train`` (its command
line is :mod:`kdtune.cli.train`): for debugging a configuration, and for the final test-set run
of a chosen one (``final``).

Writes into the output folder: ``config.yaml`` (the resolved configuration), ``metrics.jsonl``
(one line per epoch), ``checkpoint.pth`` (engine state after the last finished epoch, for
``--resume``), and at the end ``student.pth`` (``{"model": state_dict}``, mdistiller's
layout) and ``final.json``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from kdtune.config import RunConfig

logger = logging.getLogger(__name__)


def read_checkpoint(path: Path) -> dict:
    from kdtune.config import ConfigError
    from kdtune.devices import read_engine_state

    try:
        return read_engine_state(path)  # to the CPU: RNG states must stay CPU ByteTensors (CUDA resume)
    except Exception as e:  # truncated, foreign, or holding more than tensors and plain data
        raise ConfigError([f"--resume: {path}: not a readable kdtune checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); start the run afresh "
                           f"without --resume"]) from e


class RunInputError(Exception):
    """What :func:`run` finds wrong before it trains (data, teacher, a checkpoint to resume):
    one line for the user, nothing trained."""


def run(cfg: RunConfig, out: Path, *, resume: bool = False, data: Any = None,
        teacher: tuple[Any, Any] | None = None, log: Callable[[str], None] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train one run of ``cfg`` into the folder ``out`` and return what ``final.json`` holds
    (``status``: completed or diverged; the last epoch's metrics; ``teacher``: the teacher's
    record). ``data`` and ``teacher`` (``(module, TeacherInfo)``, from
    :func:`kdtune.run.load_teacher`) reuse what a caller already loaded for ``cfg``; the
    student, method and engine are always built and seeded afresh, so the same ``cfg`` gives
    the same run. ``log`` gets every line (default: this module's logger, ``kdtune.train``; see
    :mod:`kdtune.logs`); ``on_epoch`` each epoch's metrics.

    Raises :class:`RunInputError` before training when the data, the teacher or (``resume``) the
    checkpoint cannot be used. ``KeyboardInterrupt`` passes through; ``checkpoint.pth`` then
    holds the last finished epoch.
    """
    from kdtune.config import ConfigError
    from kdtune.data import DataError
    from kdtune.logs import default_handler
    from kdtune.run import build_engine, load_data, load_teacher
    from kdtune.teachers import CheckpointError, save_atomic

    default_handler()  # a library call shows its progress unless logging is configured
    say = log or logger.info
    try:
        data = data if data is not None else load_data(cfg)
        model, info = teacher if teacher is not None else load_teacher(cfg, data, log=say)
    except (ConfigError, DataError, ValueError, CheckpointError) as e:
        raise RunInputError(str(e)) from e
    engine = build_engine(cfg, data, model, log=say)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        try:
            engine.load_state_dict(read_checkpoint(out / "checkpoint.pth"))
        except ConfigError as e:
            raise RunInputError(str(e)) from e
        except (KeyError, ValueError, RuntimeError) as e:  # readable, but not this run's state
            raise RunInputError(f"--resume: {out / 'checkpoint.pth'} does not fit the run in {out / 'config.yaml'} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
        say(f"resumed {out} after epoch {engine.epoch}")
    else:
        (out / "config.yaml").write_text(yaml.safe_dump(_plain(cfg.flat()), sort_keys=False))
        (out / "metrics.jsonl").write_text("")
    if info is not None:
        say(f"teacher {info.model} ({info.source}: {info.path}) val acc {info.val_acc:.2f}")
    say(f"student {cfg.student}, method {cfg.method} {cfg.method_params or ''}, "
        f"{len(engine.loader.labels)} train images, device {engine.device}, output {out}")

    split = engine.eval_name
    best, status, last = -math.inf, "completed", {}
    start = time.perf_counter()
    try:
        for m in engine.run():
            last = m
            best = max(best, m.get(f"{split}/acc1", -math.inf))
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            save_atomic(engine.state_dict(), out / "checkpoint.pth")
            say(_epoch_line(m, split, cfg.epochs))
            if on_epoch is not None:
                on_epoch(m)
            if not math.isfinite(m["train/loss"]):
                status = "diverged"
                logger.error(f"error: training loss became {m['train/loss']} in epoch {m['epoch']}; stopping")
                break
    except KeyboardInterrupt:
        logger.warning(f"\ninterrupted after epoch {engine.epoch}; continue with: kdtune train --resume "
                       f"--output-dir {out}")
        raise
    save_atomic({"model": {k: v.cpu() for k, v in engine.distiller.student_state_dict().items()},
                 "student": cfg.student, "epoch": engine.epoch}, out / "student.pth")
    final = {"status": status, "epochs": engine.epoch, f"best_{split}_acc1": best,
             "wall_s": time.perf_counter() - start, **last,
             "teacher": None if info is None else info.__dict__}
    write_json_atomic(out / "final.json", final)
    say(f"{status}: final {split} acc {last.get(f'{split}/acc1', float('nan')):.2f}, best {best:.2f}; "
        f"wrote {out / 'student.pth'} and {out / 'final.json'}")
    return final


def write_json_atomic(path: Path, value: Any) -> None:
    """JSON to a temporary file, then renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


# A method's headline values, shown on the epoch line when present (all are in metrics.jsonl).
_SHOWN = {"kdas/ratio": "ratio", "ctkd/lambda": "lambda", "ctkd/temperature": "T"}


def _epoch_line(m: dict[str, float], split: str, epochs: int) -> str:
    terms = "  ".join(f"{k[len('train/loss_'):]} {v:.4f}" for k, v in m.items() if k.startswith("train/loss_"))
    extra = "".join(f"{label} {m[k]:.4g}  " for k, label in _SHOWN.items() if k in m)
    gates = [v for k, v in m.items() if k.startswith("sakd/gate_")]
    extra += f"gates {'/'.join(f'{g:.2f}' for g in gates)}  " if gates else ""
    return (f"epoch {m['epoch']:>3}/{epochs}  lr {m['lr']:.4g}  loss {m['train/loss']:.4f} ({terms})  {extra}"
            f"train acc {m['train/acc1']:.2f}  {split} acc {m.get(f'{split}/acc1', float('nan')):.2f}  "
            f"{m['time/epoch_s']:.1f}s")


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}



if __name__ == "__main__":  # python -m kdtune.train: the command line, kdtune.cli
    from kdtune.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
