"""``kdtune train`` (or ``python -m kdtune.train``): one distillation run without Ray, for debugging a
configuration and for the final test-set run of a chosen one (``--final``).

Writes into the output folder: ``config.yaml`` (the resolved configuration), ``metrics.jsonl``
(one line per epoch), ``checkpoint.pth`` (engine state after the last finished epoch, for
``--resume``), and at the end ``student.pth`` (``{"model": state_dict}``, mdistiller's
layout) and ``final.json``.
"""
from __future__ import annotations

import argparse
import json
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

# kdtune's own modules import torch (seconds): they are imported where they are used, once the
# arguments are parsed, so that ``--help`` and argument errors answer at once.

# Command-line flags that set a config key (flag name = key with dashes).
FLAG_KEYS = ("dataset", "data_root", "teacher", "teacher_checkpoint", "student", "method",
             "epochs", "seed", "device")
FLAG_HELP = {
    "dataset": "cifar100, cifar10, digits, synthetic or a plugin's dataset",
    "data_root": "folder that holds the dataset's files (cifar-100-python/ for cifar100)",
    "teacher": "teacher model name, e.g. resnet32x4",
    "teacher_checkpoint": "teacher weights ({'model': state_dict}); without one the teacher is trained once and cached",
    "student": "student model name, e.g. resnet8x4",
    "method": "distillation method, e.g. kd, dkd, ctkd, at, sakd; none trains the student alone",
    "epochs": "training epochs (the schedule scales to them)",
    "seed": "seed of the run (weights, split, batch order, augmentation)",
    "device": "auto (a GPU when there is one), cpu, cuda or cuda:N",
}
DESCRIPTION = """kdtune train: one distillation run without Ray, for debugging a configuration
and for the final test-set run of a chosen one (--final). Settings come from a
YAML file, flags and --set KEY=VALUE, in that order (a later one wins)."""
EXAMPLES = """examples:
  kdtune train run.yaml --set lr=0.1
  kdtune train --dataset digits --teacher resnet20 --student resnet8 --method kd --epochs 12 --set teacher_epochs=30
  kdtune train --from-search ray_results/quickstart-digits --final --seeds 3"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kdtune train", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML file of run settings (flat keys; --list prints them)")
    for key in FLAG_KEYS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=FLAG_HELP[key])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key or method hyperparameter (repeatable; see --list)")
    p.add_argument("--list", nargs="*", metavar="NAME", default=None,
                   help="print every method's and sampler's hyperparameters (or those of NAME ...) and exit")
    p.add_argument("--download", action="store_true", default=None, help="download CIFAR if missing")
    p.add_argument("--final", action="store_true", default=None,
                   help="train on the full training set (train+val) and report test accuracy")
    p.add_argument("--output-dir", default=None, help="default: runs/<dataset>-<student>-<method>-seed<seed>")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir with its saved config.yaml; takes no other "
                        "settings (edit that file to change the run)")
    g = p.add_argument_group("from a search", "re-run a search's trial (default: its best) from its run.yaml")
    g.add_argument("--from-search", metavar="FOLDER", help="a search's folder, e.g. ray_results/NAME")
    g.add_argument("--trial", metavar="ID", help="the trial to re-run (default: the best, from best.json)")
    g.add_argument("--seeds", type=int, default=1, help="run this many seeds (seed, seed+1, ...); "
                                                         "prints mean ± std (default 1)")
    g.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store for the re-runs (default: $MLFLOW_TRACKING_URI, else the search's own store "
                        "if it still exists and takes writes)")
    g.add_argument("--train-teacher", action="store_true",
                   help="train the trial's teacher (same recipe and teacher_seed) when it is not in the cache; "
                        "without it a missing teacher is an error, so that no seed distils from a teacher the "
                        "search did not have")
    return p.parse_args(argv)


def resume_conflicts(args: argparse.Namespace) -> list[str]:
    """The settings given beside --resume. A resumed run is the saved one: merging new values
    into it silently (or ignoring them, as before) would leave a run whose config.yaml does not
    say what it trained with, so they are refused."""
    given = [f"config file {args.config}"] if args.config else []
    given += ["--" + key.replace("_", "-") for key in FLAG_KEYS if getattr(args, key) is not None]
    given += [flag for flag, value in (("--set", args.overrides), ("--download", args.download),
                                       ("--final", args.final)) if value]
    return given


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    from kdtune.config import ConfigError, RunConfig, load_yaml, parse_override

    if args.resume:
        if args.output_dir is None:
            raise ConfigError(["--resume: needs --output-dir, the folder of the run to continue"])
        out = Path(args.output_dir).resolve()
        saved = out / "config.yaml"
        if not (out / "checkpoint.pth").is_file() or not saved.is_file():
            raise ConfigError([f"--resume: {out} holds no checkpoint.pth and config.yaml to resume from"])
        return RunConfig.from_dict(load_yaml(saved), str(saved)), out
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    source = args.config or "command line"
    flags = {k: getattr(args, k) for k in (*FLAG_KEYS, "download", "final") if getattr(args, k) is not None}
    for key, raw in flags.items():
        values[key] = yaml.safe_load(raw) if isinstance(raw, str) else raw
    for text in args.overrides:
        key, value = parse_override(text)
        values[key] = value
    cfg = RunConfig.from_dict(values, source)
    default = f"runs/{cfg.dataset}-{cfg.student}-{cfg.method}-seed{cfg.seed}" + ("-final" if cfg.final else "")
    return cfg, Path(args.output_dir or default).resolve()


def check_run(cfg: RunConfig, out: Path, resume: bool) -> None:
    """What can be checked before data and teacher are loaded (minutes, for a CIFAR teacher):
    the device, the output folder, and on --resume that the checkpoint can be read."""
    from kdtune.checks import device_problem, writable_dir_problem
    from kdtune.config import ConfigError

    problems = [p for p in (device_problem(cfg.device), writable_dir_problem(out, "--output-dir")) if p]
    if problems:
        raise ConfigError(problems)
    if resume:
        _read_checkpoint(out / "checkpoint.pth")


def _read_checkpoint(path: Path) -> dict:
    from kdtune.config import ConfigError
    from kdtune.devices import read_engine_state

    try:
        return read_engine_state(path)  # to the CPU: RNG states must stay CPU ByteTensors (CUDA resume)
    except Exception as e:  # truncated, foreign, or holding more than tensors and plain data
        raise ConfigError([f"--resume: {path}: not a readable kdtune checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); start the run afresh "
                           f"without --resume"]) from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list is not None:
        from kdtune.listing import text

        print(text(args.list))
        return 0
    if args.from_search is not None:
        if args.config or args.resume or any(getattr(args, k) is not None for k in FLAG_KEYS):
            print("error: --from-search takes its configuration from the search's trial; give no config "
                  "file, --resume or setting flags with it (--set, --final, --seeds, --output-dir, --tracking-uri and "
                  "--train-teacher are fine)",
                  file=sys.stderr)
            return 2
        # The one place the core calls up into the search layer, lazily: it needs MLflow to log the
        # re-runs, and a plain ``train`` run must not load it.
        from kdtune.search.final import main as from_search
        return from_search(args.from_search, args.trial, bool(args.final), args.seeds, args.output_dir,
                           args.overrides, train_teacher=args.train_teacher, tracking_uri=args.tracking_uri)
    if args.trial is not None or args.seeds != 1 or args.train_teacher or args.tracking_uri:
        print("error: --trial, --seeds, --train-teacher and --tracking-uri go with --from-search", file=sys.stderr)
        return 2
    if args.resume and (given := resume_conflicts(args)):
        print(f"error: --resume continues the saved run and takes no other settings, but got {', '.join(given)}; "
              f"to change the run, edit config.yaml in its --output-dir", file=sys.stderr)
        return 2
    from kdtune.config import ConfigError

    try:
        cfg, out = resolve_config(args)
        check_run(cfg, out, args.resume)
        result = run(cfg, out, resume=args.resume)
    except (ConfigError, RunInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # run() said where it stopped and how to continue
        return 130
    return 0 if result["status"] == "completed" else 1


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
    the same run. ``log`` gets every line (default: print); ``on_epoch`` each epoch's metrics.

    Raises :class:`RunInputError` before training when the data, the teacher or (``resume``) the
    checkpoint cannot be used. ``KeyboardInterrupt`` passes through; ``checkpoint.pth`` then
    holds the last finished epoch.
    """
    from kdtune.config import ConfigError
    from kdtune.data import DataError
    from kdtune.run import build_engine, load_data, load_teacher
    from kdtune.teachers import CheckpointError, save_atomic

    say = log or (lambda msg: print(msg, flush=True))
    try:
        data = data if data is not None else load_data(cfg)
        model, info = teacher if teacher is not None else load_teacher(cfg, data, log=say)
    except (ConfigError, DataError, ValueError, CheckpointError) as e:
        raise RunInputError(str(e)) from e
    engine = build_engine(cfg, data, model, log=say)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        try:
            engine.load_state_dict(_read_checkpoint(out / "checkpoint.pth"))
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
                print(f"error: training loss became {m['train/loss']} in epoch {m['epoch']}; stopping",
                      file=sys.stderr)
                break
    except KeyboardInterrupt:
        print(f"\ninterrupted after epoch {engine.epoch}; continue with: kdtune train --resume --output-dir {out}",
              file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
