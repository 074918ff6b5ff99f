"""The shipped reference setups (search_spaces/reference/): every file validates, and its teacher,
student and method build, against a fabricated CIFAR-100 and teacher files written in mdistiller's
layout (download_ckpts/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth, {"model": state_dict}).

Each file also carries the reference's hyperparameters: the values below are read from the
reference repositories (kd_methods.md), not from the files, so a wrong value in a file fails here.
Nothing is trained.
"""
from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from kdtune import cli
from kdtune.cli import train
from kdtune.config import RunConfig
from kdtune.models import build_model
from kdtune.run import build_engine, load_data, load_teacher
from kdtune.search.spec import load_spec
from tests.conftest import write_cifar

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "search_spaces" / "reference"
FILES = sorted(REFERENCE.rglob("*.yaml"))
SEARCHES = [p for p in FILES if "space" in yaml.safe_load(p.read_text())]
RUNS = [p for p in FILES if p not in SEARCHES]
# What a test run may change: a validation split the 60 fabricated images can hold, its own cache.
SMALL = {"val_size": 10}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def teachers() -> set[str]:
    found = set()
    for path in FILES:
        values = yaml.safe_load(path.read_text())
        found.add(values.get("fixed", values)["teacher"])
    return found


@pytest.fixture(autouse=True)
def _one_thread():
    """Forwards of 2 to 10 images: thread start-up costs more than it saves on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder laid out as the shipped files expect: data/cifar-100-python/ and download_ckpts/."""
    tmp = tmp_path_factory.mktemp("reference")
    write_cifar(tmp / "data", "cifar100", n_train=60, n_test=20)
    torch.manual_seed(0)
    for name in sorted(teachers()):
        path = tmp / "download_ckpts" / "cifar_teachers" / f"{name}_vanilla" / "ckpt_epoch_240.pth"
        path.parent.mkdir(parents=True)
        model = build_model(name, num_classes=100)
        # mdistiller's teachers also carry CRD's bookkeeping keys; only "model" is read
        torch.save({"model": model.state_dict(), "epoch": 240, "accuracy": 0.0}, path)
    return tmp


@pytest.fixture(scope="module")
def teachers_loaded() -> dict:
    """The teachers load_teacher has loaded, by everything it reads for a checkpoint: the 39 setups
    built here load 6 teacher files, each once."""
    return {}


def build_once(cfg: RunConfig, loaded: dict) -> None:
    """Data, teacher (from the fabricated file), student and method, and one loss on two images."""
    data = load_data(cfg)
    path = str(Path(cfg.teacher_checkpoint).resolve())
    key = (cfg.teacher, path, data.num_classes, data.in_channels, cfg.device)
    if key not in loaded:
        loaded[key] = load_teacher(cfg, data, log=lambda _: None)
    teacher, info = loaded[key]
    assert info.source == "checkpoint" and info.path == path and info.model == cfg.teacher
    engine = build_engine(cfg, data, teacher)
    assert type(engine.distiller).__name__ and (engine.sampler is None) == (cfg.sampler == "none")
    x, y = data.train.images[:2].float() / 255, data.train.labels[:2]
    engine.distiller.train()
    _, losses = engine.distiller(x.to(engine.device), y.to(engine.device))
    assert all(torch.isfinite(v).all() for v in losses.values()), losses


# --------------------------------------------------------------------------- every file


def test_the_reference_setups_are_shipped() -> None:
    names = {rel(p).removeprefix("search_spaces/reference/") for p in FILES}
    assert {f"kdas/vgg13_vgg8-{k}.yaml" for k in ("kd", "dkd", "ls", "search")} <= names
    ctkd_pairs = ["resnet56-resnet20", "resnet110-resnet32", "resnet110-resnet20", "wrn_40_2-wrn_16_2",
                  "wrn_40_2-wrn_40_1", "vgg13-vgg8"]
    assert {f"ctkd/{p}-{m}.yaml" for p in ctkd_pairs for m in ("kd", "ctkd")} <= names
    sakd_pairs = ["ResNet50-MobileNetV2", "ResNet50-vgg8", "resnet110-resnet32", "resnet32x4-resnet32",
                  "resnet32x4-resnet8x4", "resnet56-resnet20", "vgg13-MobileNetV2", "vgg13-vgg8",
                  "wrn_40_2-ShuffleNetV1", "wrn_40_2-wrn_16_2"]  # SAKD's configs/cifar-100/seed-1029/at/
    assert {f"sakd/at/{p}.yaml" for p in sakd_pairs} <= names
    assert "mdistiller/kd.yaml" in names and len([n for n in names if n.startswith("mdistiller/dkd/")]) == 11


@pytest.mark.parametrize("path", RUNS, ids=lambda p: rel(p).removeprefix("search_spaces/reference/"))
def test_run_file_validates_and_builds(path: Path, workdir: Path, teachers_loaded: dict, monkeypatch) -> None:
    text = path.read_text()
    assert text.startswith("#") and f"kdtune train {rel(path)}" in text  # says how to run it
    monkeypatch.chdir(workdir)
    args = cli.parse_args(["train", str(path), "--final", *[f"--set={k}={v}" for k, v in SMALL.items()],
                             f"--set=cache_dir={workdir / 'cache'}"])
    cfg, _ = train.resolve_config(args)
    values = yaml.safe_load(text)
    flat = cfg.flat()
    for key, value in values.items():  # nothing dropped or renamed on the way in
        assert flat[key] == (tuple(value) if isinstance(value, list) else value), key
    assert cfg.dataset == "cifar100" and cfg.final
    assert cfg.teacher_checkpoint == f"download_ckpts/cifar_teachers/{cfg.teacher}_vanilla/ckpt_epoch_240.pth"
    build_once(cfg, teachers_loaded)


@pytest.mark.parametrize("path", SEARCHES, ids=lambda p: rel(p).removeprefix("search_spaces/reference/"))
def test_search_file_dry_runs_and_every_method_builds(path: Path, workdir: Path, teachers_loaded: dict, monkeypatch,
                                                        capsys) -> None:
    text = path.read_text()
    assert text.startswith("#") and f"kdtune search {rel(path)}" in text
    monkeypatch.chdir(workdir)
    # a dry run checks resources and reads the data: no GPU here, and 60 fabricated train images
    assert cli.main(["search", str(path), "--dry-run", "--gpus-per-trial", "0", "--set", "fixed.val_size=10"]) == 0
    assert "# translated space" in capsys.readouterr().out
    overrides = [f"fixed.{k}={v}" for k, v in SMALL.items()] + [f"fixed.cache_dir={workdir / 'cache'}"]
    spec = load_spec(path, overrides)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    built = set()
    for _ in range(40):  # draws until every method choice has been built once
        trial = study.ask()
        spec.space.suggest(trial)
        cfg = spec.run_config(trial.params)
        if cfg.method not in built:
            build_once(cfg, teachers_loaded)
            built.add(cfg.method)
    assert built == set(spec.space.methods or [spec.fixed["method"]])


def test_docs_name_existing_files() -> None:
    page = (ROOT / "docs" / "reference-setups.md").read_text()
    named = set(re.findall(r"search_spaces/reference/[\w./-]+\.yaml", page))
    assert len(named) >= 8 and all((ROOT / path).is_file() for path in named), named


def test_a_missing_teacher_file_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no download_ckpts/ here
    path = REFERENCE / "ctkd" / "vgg13-vgg8-ctkd.yaml"
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "teacher_checkpoint: file not found: 'download_ckpts/cifar_teachers/vgg13_vanilla/ckpt_epoch_240.pth'" in err


# --------------------------------------------------------------------------- the reference's values


def load(name: str) -> dict:
    return yaml.safe_load((REFERENCE / name).read_text())


RECIPE = {"epochs": 240, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4}
KDAS = {"start_rate": 0.6, "end_rate": 0.4, "sampling_period": "1,3,5,10", "exclusion_rate": 0.05,
        "penalty_factor": 0.5, "penalty_lambda": 1000.0, "penalty_warmup": 0, "kdas_warmup": 0, "threshold": 0.2}


@pytest.mark.parametrize("run, method", [
    ("kd", {"method": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 9.0, "reverse_kl": False}),
    ("dkd", {"method": "dkd", "alpha": 1.0, "beta": 6.0, "temperature": 4.0, "warmup": 20, "ce_weight": 1.0}),
    ("ls", {"method": "kd", "logit_stand": True, "temperature": 2.0, "kd_weight": 9.0, "ce_weight": 0.1}),
])
def test_kdas_runs_are_the_readme_commands(run: str, method: dict) -> None:
    values = load(f"kdas/vgg13_vgg8-{run}.yaml")
    expected = {"teacher": "vgg13", "student": "vgg8", "sampler": "kdas", **KDAS, **method, **RECIPE,
                "lr": 0.05, "schedule": "cosine", "lr_min": 1e-5}  # KDAS's cfg.py: cosine, eta_min 1e-5
    assert {k: values.get(k) for k in expected} == expected


def test_kdas_search_holds_the_three_runs() -> None:
    spec = load("kdas/vgg13_vgg8-search.yaml")
    choices = spec["space"]["method"]["choices"]
    assert set(choices) == {"kd", "dkd"} and spec["fixed"]["sampler"] == "kdas"
    assert {True, False} <= set(choices["kd"]["logit_stand"]["choices"])
    assert {2.0, 4.0} <= set(choices["kd"]["temperature"]["choices"]) and choices["kd"]["kd_weight"]["choices"] == [9.0]
    assert choices["dkd"]["beta"]["choices"] == [6.0]
    assert {k: spec["fixed"][k] for k in ("schedule", "lr", "teacher", "student")} == \
        {"schedule": "cosine", "lr": 0.05, "teacher": "vgg13", "student": "vgg8"}


@pytest.mark.parametrize("teacher, student", [("resnet56", "resnet20"), ("resnet110", "resnet32"),
                                              ("resnet110", "resnet20"), ("wrn_40_2", "wrn_16_2"),
                                              ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8")])
def test_ctkd_pairs_run_the_readme_script(teacher: str, student: str) -> None:
    step = {**RECIPE, "lr": 0.05, "schedule": "step", "lr_decay_epochs": [150, 180, 210], "lr_decay_rate": 0.1}
    kd, ctkd = (load(f"ctkd/{teacher}-{student}-{m}.yaml") for m in ("kd", "ctkd"))
    assert {k: kd[k] for k in ("method", "temperature", "ce_weight", "kd_weight")} == \
        {"method": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}  # -r 0.1 -a 0.9 --kd_T 4
    ctkd_expected = {"method": "ctkd", "ce_weight": 0.1, "kd_weight": 0.9, "temperature_mode": "global",
                     "t_start": 1.0, "t_end": 20.0, "curriculum": "cosine", "curriculum_epochs": 10,
                     "lambda_max": 1.0}
    assert {k: ctkd[k] for k in ctkd_expected} == ctkd_expected
    for values in (kd, ctkd):
        assert (values["teacher"], values["student"]) == (teacher, student)
        assert {k: values[k] for k in step} == step


@pytest.mark.parametrize("name, lr, homo", [
    ("ResNet50-MobileNetV2", 0.01, False), ("ResNet50-vgg8", 0.05, False), ("resnet110-resnet32", 0.05, True),
    ("resnet32x4-resnet32", 0.05, False), ("resnet32x4-resnet8x4", 0.05, True), ("resnet56-resnet20", 0.05, True),
    ("vgg13-MobileNetV2", 0.01, False), ("vgg13-vgg8", 0.05, True), ("wrn_40_2-ShuffleNetV1", 0.01, False),
    ("wrn_40_2-wrn_16_2", 0.05, True)])
def test_sakd_pairs_are_the_released_at_configs(name: str, lr: float, homo: bool) -> None:
    values = load(f"sakd/at/{name}.yaml")
    expected = {"method": "sakd", "feature_loss": "at", "feat_weight": 1000.0, "route_gamma": 2.0,
                "kd_weight": 1.0, "ce_weight": 1.0, "temperature": 4.0, "gates": "policy",
                "gumbel_temperature": 5.0, "gate_bias": 10.0 if homo else 0.0, "policy_lr_scale": 0.5,
                "policy_weight_decay": 1e-3, "seed": 1029, "lr": lr, **RECIPE}
    assert {k: values.get(k) for k in expected} == expected


def test_sakd_anti_is_one_override(workdir: Path, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    path = REFERENCE / "sakd" / "at" / "vgg13-vgg8.yaml"
    cfg, _ = train.resolve_config(cli.parse_args(["train", str(path), "--set", "gates=anti"]))
    assert cfg.method_params["gates"] == "anti"


@pytest.mark.parametrize("name, beta, lr", [
    ("res56_res20", 2.0, 0.05), ("res110_res32", 2.0, 0.05), ("res32x4_res8x4", 8.0, 0.05),
    ("res32x4_shuv1", 8.0, 0.01), ("res32x4_shuv2", 8.0, 0.01), ("res50_mv2", 8.0, 0.01),
    ("vgg13_mv2", 6.0, 0.01), ("vgg13_vgg8", 6.0, 0.05), ("wrn40_2_shuv1", 8.0, 0.01),
    ("wrn40_2_wrn_16_2", 6.0, 0.05), ("wrn40_2_wrn_40_1", 6.0, 0.05)])
def test_mdistiller_dkd_configs(name: str, beta: float, lr: float) -> None:
    values = load(f"mdistiller/dkd/{name}.yaml")
    expected = {"method": "dkd", "alpha": 1.0, "beta": beta, "temperature": 4.0, "warmup": 20, "ce_weight": 1.0,
                "lr": lr, "schedule": "step", **RECIPE}
    assert {k: values.get(k) for k in expected} == expected
