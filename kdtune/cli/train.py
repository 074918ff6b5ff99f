"""``kdtune train``: its arguments, declared in a module that imports nothing heavy (``--help``
answers before torch loads), and the run: :func:`kdtune.train.run`, or with ``--from-search``
the re-runs of a search's trial (:func:`kdtune.search.final.main`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdtune.config import RunConfig

HELP = "one distillation run without Ray; --final for the test-set run of a chosen configuration"
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


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--output-dir", default=None, metavar="FOLDER",
                   help="the run's folder (default: runs/<dataset>-<student>-<method>-seed<seed>)")
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
    """The run's configuration (the YAML file, then the flags, then --set) and its folder."""
    import yaml

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
    from kdtune.train import read_checkpoint

    problems = [p for p in (device_problem(cfg.device), writable_dir_problem(out, "--output-dir")) if p]
    if problems:
        raise ConfigError(problems)
    if resume:
        read_checkpoint(out / "checkpoint.pth")


def run(args: argparse.Namespace) -> int:
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
        # the search layer (MLflow), loaded only here: a plain run never imports it
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
    from kdtune.train import RunInputError, run as train

    try:
        cfg, out = resolve_config(args)
        check_run(cfg, out, args.resume)
        result = train(cfg, out, resume=args.resume)
    except (ConfigError, RunInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # run() said where it stopped and how to continue
        return 130
    return 0 if result["status"] == "completed" else 1
