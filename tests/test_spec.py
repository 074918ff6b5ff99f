from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from optuna.samplers import RandomSampler
from ray.tune.search.variant_generator import generate_variants

from kdtune.config import ConfigError, RunConfig
from kdtune.search.spec import load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))
BASE = {
    "name": "test-search",
    "fixed": {"dataset": "digits", "teacher": "resnet20", "student": "resnet8", "method": "kd", "epochs": 16},
    "space": {"temperature": {"type": "float", "low": 1, "high": 8, "log": True},
              "kd_weight": {"type": "float", "low": 0.5, "high": 2.0}},
}
CONDITIONAL = {
    "name": "methods",
    "fixed": {"dataset": "digits", "teacher": "resnet20", "student": "resnet8", "epochs": 16},
    "space": {"method": {"type": "categorical", "choices": {
        "none": {},
        "kd": {"temperature": {"type": "float", "low": 1, "high": 8, "log": True}},
        "dkd": {"beta": {"type": "categorical", "choices": [2, 8]},
                "temperature": {"type": "float", "low": 2, "high": 6, "log": True}}}},
        "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
}


def write(tmp_path: Path, content: dict | str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def problems_of(path: Path, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_spec(path, overrides)
    return e.value.problems


# --------------------------------------------------------------------------- shipped files

def _needs_checkpoint(path: Path) -> bool:
    return yaml.safe_load(path.read_text())["fixed"].get("teacher_checkpoint") is not None


def test_the_four_search_spaces_are_shipped() -> None:
    assert {p.stem for p in SHIPPED} >= {"quickstart", "kd", "dkd", "methods"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_loads_and_every_sample_is_a_valid_run(path: Path) -> None:
    overrides = ["fixed.teacher_checkpoint=null"] if _needs_checkpoint(path) else []
    spec = load_spec(path, overrides)
    assert spec.path == str(path.resolve())
    text = path.read_text()  # says what it is and how to run it
    assert text.startswith("#") and f"kdtune search search_spaces/{path.name}" in text
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    for _ in range(30):  # Optuna's define-by-run translation ...
        trial = study.ask()
        spec.space.suggest(trial)
        assert isinstance(spec.run_config(trial.params), RunConfig)
    rng = np.random.default_rng(0)
    for _ in range(30):  # ... and Tune's, whose inactive parameters are None
        config = next(iter(generate_variants(spec.space.to_tune(), random_state=rng)))[1]
        assert isinstance(spec.run_config(config), RunConfig)
    yaml.safe_dump(spec.resolved)  # printable by --dry-run ...
    assert json.loads(json.dumps(spec.resolved)) == spec.resolved  # ... and comparable after a round trip


@pytest.mark.parametrize("path", [p for p in SHIPPED if _needs_checkpoint(p)], ids=lambda p: p.stem)
def test_shipped_cifar_space_reports_the_missing_teacher_checkpoint(path: Path) -> None:
    problems = problems_of(path)
    assert len(problems) == 1
    expected = str(Path(yaml.safe_load(path.read_text())["fixed"]["teacher_checkpoint"]).resolve())
    assert problems[0] == f"{path}: fixed.teacher_checkpoint: file not found: {expected!r}"


def test_quickstart_is_the_small_cpu_search() -> None:
    spec = load_spec(SHIPPED[[p.stem for p in SHIPPED].index("quickstart")])
    assert spec.fixed["dataset"] == "digits" and spec.max_epochs == 12 and spec.num_samples == 12
    assert (spec.algorithm, spec.scheduler, spec.grace_period, spec.reduction_factor) == ("tpe", "asha", 2, 2.0)
    assert (spec.cpus_per_trial, spec.gpus_per_trial, spec.max_concurrent) == (1.0, 0.0, 2)
    assert spec.space.params["lr"].log


# --------------------------------------------------------------------------- broken files and overrides

BROKEN = [  # (overrides, the one problem expected): a value set by --set is reported against the --set
    (["search.mode=maximize"], "--set search.mode=maximize: search.mode: must be one of max, min, but got 'maximize'"),
    (["space.temprature={type: float, low: 1, high: 8}"],
     "--set space.temprature={type: float, low: 1, high: 8}: space.temprature: unknown hyperparameter for method "
     "'kd'; did you mean 'temperature'? (kd takes: temperature, ce_weight, kd_weight, logit_stand"),
    (["fixed.student=resnet8x5"],
     "--set fixed.student=resnet8x5: fixed.student: unknown model 'resnet8x5'; did you mean 'resnet8x4'?"),
    (["space.temperature.log=false", "space.temperature.low=0"],
     "--set space.temperature.low=0: space.temperature.low: temperature: must be > 0, but got 0.0"),
    (["space.temperature.low=0"],
     "--set space.temperature.low=0: space.temperature.low: must be > 0 when log is true, but got 0.0"),
    (["space.kd_weight.low=-1"], "--set space.kd_weight.low=-1: space.kd_weight.low: kd_weight: must be >= 0, "
                                 "but got -1.0"),
    (["space.kd_weight.high=0.1"],
     "space.yaml: space.kd_weight.low: must be <= high, but got low=0.5, high=0.1"),
    (["search.num_samples=abc"],
     "--set search.num_samples=abc: search.num_samples: expected an integer, but got 'abc'"),
    (["fixed.epochs=10"], "space.yaml: scheduler.grace_period: must be <= fixed.epochs (10), but got 12"),
    (["resources.gpus_per_trial=1.5"],
     "--set resources.gpus_per_trial=1.5: resources.gpus_per_trial: must be in [0, 1] (a share of one "
     "GPU), or a whole number above 1 for a data-parallel trial with one worker per GPU, but got 1.5"),
    (["resources.workers_per_trial=2", "resources.gpus_per_trial=1"],
     "--set resources.gpus_per_trial=1: resources.gpus_per_trial: must be 0 or workers_per_trial (2) in a "
     "data-parallel trial (each worker drives one GPU), but got 1.0"),
    (["resources.workers_per_trial=0"],
     "--set resources.workers_per_trial=0: resources.workers_per_trial: must be >= 1 (or null for gpus_per_trial "
     "when a whole number above 1, else 1), but got 0"),
    (["resources.workers_per_trial=2", "scheduler.type=pbt", "search.algorithm=random"],
     "--set scheduler.type=pbt: scheduler.type: must not be pbt with workers_per_trial 2 (a data-parallel trial "
     "has no Tune checkpoint to copy or resume); use asha, median or none"),
    (["resources.workers_per_trial=2", "fixed.method=crd"],
     "--set resources.workers_per_trial=2: resources.workers_per_trial: must be 1 with method crd (its "
     "per-process state, a memory over the training set or a strong view's random stream, would differ "
     "between workers), but got 2"),
    (["resources.workers_per_trial=2", "fixed.dataset=imagenet"],
     "--set resources.workers_per_trial=2: resources.workers_per_trial: must be 1 with dataset imagenet (a "
     "streaming dataset has no per-worker shard yet; several workers need cifar100, cifar10 or digits), but got 2"),
    (["resources.cpus_per_trial=0"], "--set resources.cpus_per_trial=0: resources.cpus_per_trial: must be > 0, "
                                     "but got 0.0"),
    (["search.metric=val/acc"], "--set search.metric=val/acc: search.metric: must be one of val/acc1, val/acc5, "
                                "val/loss, train/loss, but got 'val/acc'"),
    (["search.algorithm=bayes"],
     "--set search.algorithm=bayes: search.algorithm: must be one of tpe, gp, random, grid, but got 'bayes'"),
    (["search.seed=1.5"], "--set search.seed=1.5: search.seed: expected an integer, but got 1.5"),
    (["search.max_concurrent=0"], "--set search.max_concurrent=0: search.max_concurrent: must be >= 1 (or null for as many as the "
                                  "resources allow), but got 0"),
    (["scheduler.reduction_factor=1"],
     "--set scheduler.reduction_factor=1: scheduler.reduction_factor: must be > 1, but got 1.0"),
    (["scheduler.type=pbt2"],
     "--set scheduler.type=pbt2: scheduler.type: must be one of asha, hyperband, median, pbt, pb2, none, but got "
     "'pbt2'"),
    (["scheduler.type=median", "fixed.epochs=10"],
     "space.yaml: scheduler.grace_period: must be <= fixed.epochs (10), but got 12"),
    (["scheduler.type=hyperband", "search.max_concurrent=2"],
     "--set search.max_concurrent=2: search.max_concurrent: must be unset with scheduler.type hyperband (paused "
     "trials count against it), but got 2"),
    (["max_failures=-1"], "--set max_failures=-1: max_failures: must be >= 0, but got -1"),
    (["checkpoint_every_s=-5"], "--set checkpoint_every_s=-5: checkpoint_every_s: must be >= 0 (0: a checkpoint "
                                "every epoch), but got -5.0"),
    (["checkpoint_every_s=often"], "--set checkpoint_every_s=often: checkpoint_every_s: expected a number, "
                                   "but got 'often'"),
    (["name=a/b"], "--set name=a/b: name: must be made of letters, digits, '_', '.' and '-', but got 'a/b'"),
    (["space.lr={type: int, low: 1, high: 10, step: 4}"],
     "--set space.lr={type: int, low: 1, high: 10, step: 4}: space.lr.step: high - low must be a multiple of step, "
     "but got low=1, high=10, step=4"),
    (["space.logit_stand={type: categorical, choices: [true, true]}"],
     "--set space.logit_stand={type: categorical, choices: [true, true]}: space.logit_stand.choices[1]: "
     "must not repeat choices[0], but got True"),
    (["space.logit_stand={type: categorical, choices: [true, 0]}"],
     "--set space.logit_stand={type: categorical, choices: [true, 0]}: space.logit_stand.choices[1]: "
     "logit_stand: expected true or false, but got 0"),
    (["space.epochs={type: int, low: 1, high: 10}"],
     "--set space.epochs={type: int, low: 1, high: 10}: space.epochs: cannot be searched"),
    (["fixed.temperature=4"], "space.yaml: space.temperature: also set under fixed (temperature: 4.0); "
                              "a hyperparameter is either fixed or searched"),
    (["space.temperature.type=floatt"], "--set space.temperature.type=floatt: space.temperature.type: "
                                        "must be one of float, int, categorical, but got 'floatt'"),
    (["search.algorithm=grid", "space.kd_weight={type: categorical, choices: [1, 2]}"],
     "space.yaml: space.temperature: grid search needs values to enumerate, but got a float range"),
    (["fixed.teacher_checkpoint=missing.pth"],
     "--set fixed.teacher_checkpoint=missing.pth: fixed.teacher_checkpoint: file not found: '{tmp}/missing.pth'"),
    (["fixed.epochs=many"], "--set fixed.epochs=many: fixed.epochs: expected an integer, but got 'many'"),
    (["serch.num_samples=8"],
     "--set serch.num_samples=8: the top level has no key 'serch'; did you mean 'search'?"),
    (["space.nope.high=2"], "--set space.nope.high=2: space has no key 'nope'"),
    (["fixed.epochs.value=3"], "--set fixed.epochs.value=3: fixed.epochs is not a mapping, but 96"),
    (["novalue"], "--set 'novalue': expected key=value"),
]


@pytest.mark.parametrize("overrides, expected", BROKEN, ids=[o[0] for o, _ in BROKEN])
def test_broken_spec_names_the_yaml_path_and_the_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      overrides: list[str], expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {**BASE, "scheduler": {"grace_period": 12}, "fixed": {**BASE["fixed"], "epochs": 96}})
    problems = problems_of(Path("space.yaml"), overrides)
    assert len(problems) == 1, "\n".join(problems)  # one mistake, one line: no follow-on noise
    assert problems[0].startswith(expected.replace("{tmp}", str(tmp_path.resolve()))), problems[0]


@pytest.mark.parametrize("content, expected", [
    ({**BASE, "serach": {}}, "space.yaml: serach: unknown key; did you mean 'search'?"),
    ({**BASE, "search": {"mode": "maximize"}},
     "space.yaml: search.mode: must be one of max, min, but got 'maximize'"),
    ({k: v for k, v in BASE.items() if k != "space"}, "space.yaml: space: missing"),
    ({k: v for k, v in BASE.items() if k != "name"}, "space.yaml: name: missing"),
    ({**BASE, "fixed": ["dataset", "digits"]}, "space.yaml: fixed: expected a mapping of run settings, but got"),
    ({**BASE, "space": {}}, "space.yaml: space: expected a mapping of hyperparameter names to ranges, but got {}"),
    ({**BASE, "space": {"lr": 0.1}}, "space.yaml: space.lr: expected a mapping such as"),
    ({**BASE, "search": [1, 2]}, "space.yaml: search: expected a mapping, but got [1, 2]"),
    ({**BASE, "search": {"num_sample": 4}},
     "space.yaml: search.num_sample: unknown key; did you mean 'num_samples'?"),
    ({**BASE, "fixed": {**BASE["fixed"], "method_params": {"temperature": 2}}},
     "space.yaml: fixed.method_params: write method hyperparameters as flat keys"),
    ("name: [unclosed", "space.yaml: not valid YAML"),
])
def test_broken_file(tmp_path: Path, content: Any, expected: str) -> None:
    problems = problems_of(write(tmp_path, content))
    assert any(p.startswith(str(tmp_path / expected)) for p in problems), "\n".join(problems)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, """
name: four-problems
fixed: {dataset: digits, student: resnet8x5, method: kd, epochs: 16}
space:
  temperature: {type: float, low: 1, high: 8, log: true}
  kd_weight: {type: float, low: 2, high: 0.5}
search: {mode: maximize}
shceduler: {type: asha}
""")
    problems = problems_of(path)
    assert len(problems) == 4, "\n".join(problems)
    for text in ("fixed.student: unknown model 'resnet8x5'", "space.kd_weight.low: must be <= high",
                 "search.mode: must be one of max, min, but got 'maximize'", "shceduler: unknown key"):
        assert sum(text in p for p in problems) == 1, text


@pytest.mark.parametrize("change, expected", [
    ({"fixed": {**CONDITIONAL["fixed"], "method": "kd"}},
     "fixed.method: must be left out when space.method searches it, but got 'kd'"),
    ({"space": {**CONDITIONAL["space"], "temperature": {"type": "float", "low": 1, "high": 4}}},
     "space.temperature: unknown hyperparameter for method 'none' (none takes: nothing; or a run setting such as "
     "lr); search it under space.method.choices.<method> for the methods that take it"),
    ({"space": {"method": {"type": "categorical", "choices": {"kdd": {}, "kd": {}}}}},
     "space.method.choices.kdd: unknown method 'kdd'; did you mean 'kd'?"),
    ({"space": {"method": {"type": "categorical", "choices": {
        "kd": {"beta": {"type": "categorical", "choices": [2, 8]}}}}}},
     "space.method.choices.kd.beta: unknown hyperparameter for method 'kd'"),
    ({"space": {"method": {"type": "categorical", "choices": {
        "dkd": {"beta": {"type": "float", "low": -1, "high": 8}}}}}},
     "space.method.choices.dkd.beta.low: beta: must be >= 0, but got -1.0"),
    ({"fixed": {**CONDITIONAL["fixed"], "temperature": 4}},
     "fixed.temperature: unknown key; it is a hyperparameter of methods 'crd', 'dist', 'dkd', 'kd', 'mlkd' and "
     "'sakd'"),
    ({"search": {"algorithm": "gp"}},
     "search.algorithm: gp needs one fixed set of parameters, but the space searches method with sub-spaces; "
     "use tpe"),
])
def test_conditional_spec_problems(tmp_path: Path, change: dict, expected: str) -> None:
    problems = problems_of(write(tmp_path, {**CONDITIONAL, **change}))
    assert any(p.startswith(f"{tmp_path / 'space.yaml'}: {expected}") for p in problems), "\n".join(problems)


# --------------------------------------------------------------------------- resolving

def test_conditional_spec_resolves(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, CONDITIONAL))
    assert list(spec.space.methods) == ["none", "kd", "dkd"] and "method" not in spec.fixed
    assert spec.space.names() == ["method", "temperature", "beta", "lr"]
    cfg = spec.run_config({"method": "dkd", "beta": 2, "temperature": 3.0, "lr": 0.02})
    assert (cfg.method, cfg.method_params, cfg.lr) == ("dkd", {"beta": 2.0, "temperature": 3.0}, 0.02)
    cfg = spec.run_config({"method": "none", "beta": None, "temperature": None, "lr": 0.02})
    assert (cfg.method, cfg.method_params) == ("none", {})


def test_defaults_are_filled(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE))
    assert (spec.algorithm, spec.num_samples, spec.metric, spec.mode, spec.seed, spec.max_concurrent) == (
        "tpe", 32, "val/acc1", "max", 0, None)
    assert (spec.scheduler, spec.grace_period, spec.reduction_factor) == ("asha", 2, 3.0)  # 16 // 8
    assert (spec.cpus_per_trial, spec.gpus_per_trial, spec.max_failures) == (1.0, 0.0, 2)
    assert spec.max_epochs == 16 and spec.name == "test-search"
    assert spec.resolved["search"] == {"algorithm": "tpe", "num_samples": 32, "metric": "val/acc1", "mode": "max",
                                       "seed": 0, "max_concurrent": None}
    assert spec.resolved["scheduler"] == {"type": "asha", "grace_period": 2, "reduction_factor": 3.0}
    assert spec.resolved["space"] == {"temperature": {"type": "float", "low": 1.0, "high": 8.0, "log": True},
                                      "kd_weight": {"type": "float", "low": 0.5, "high": 2.0}}
    no_epochs = {**BASE, "fixed": {k: v for k, v in BASE["fixed"].items() if k != "epochs"}}
    spec = load_spec(write(tmp_path, no_epochs))
    assert spec.max_epochs == RunConfig.epochs and spec.grace_period == RunConfig.epochs // 8


def test_dotted_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    spec = load_spec(path, ["fixed.epochs=20", "search.num_samples=8", "space.kd_weight.high=3",
                            "resources.gpus_per_trial=0.25", "scheduler.type=none", "search.max_concurrent=2",
                            "space.lr={type: float, low: 1e-3, high: 0.1, log: true}", "fixed.momentum=8e-1"])
    assert spec.max_epochs == 20 and spec.num_samples == 8 and spec.gpus_per_trial == 0.25
    assert spec.space.params["kd_weight"].high == 3.0 and spec.space.params["lr"].low == 1e-3
    assert spec.scheduler == "none" and spec.max_concurrent == 2
    assert spec.fixed["momentum"] == 0.8 and isinstance(spec.fixed["momentum"], float)
    assert spec.resolved["fixed"]["epochs"] == 20 and "resources" not in yaml.safe_load(path.read_text())
    assert load_spec(path, ["resources.gpus_per_trial=1"]).gpus_per_trial == 1.0


def test_numbers_written_as_strings(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, """
name: strings
fixed: {dataset: digits, method: kd, epochs: 16, weight_decay: 1e-4}
space:
  lr: {type: float, low: 1e-3, high: 1e-1, log: true}
scheduler: {reduction_factor: 2e0}
"""))
    assert spec.fixed["weight_decay"] == 1e-4 and spec.space.params["lr"].low == 1e-3
    assert spec.reduction_factor == 2.0


def test_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "t.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    fixed = {**BASE["fixed"], "data_root": "data", "teacher_checkpoint": "ckpts/t.pth", "cache_dir": "../cache"}
    spec = load_spec(write(tmp_path, {**BASE, "fixed": fixed}))
    assert spec.fixed["data_root"] == str(tmp_path / "data")
    assert spec.fixed["teacher_checkpoint"] == str(tmp_path / "ckpts" / "t.pth")
    assert spec.fixed["cache_dir"] == str(tmp_path.parent / "cache")
    fixed = {**BASE["fixed"], "cache_dir": "~/.cache/kdtune", "data_root": "/data"}
    spec = load_spec(write(tmp_path, {**BASE, "fixed": fixed}))
    assert (spec.fixed["cache_dir"], spec.fixed["data_root"]) == ("~/.cache/kdtune", "/data")


def test_grid_search_counts_its_points(tmp_path: Path) -> None:
    space = {"temperature": {"type": "categorical", "choices": [2, 4, 8]},
             "kd_weight": {"type": "float", "low": 0.5, "high": 1.0, "step": 0.25}}
    spec = load_spec(write(tmp_path, {**BASE, "space": space, "search": {"algorithm": "grid", "num_samples": 5}}))
    assert spec.num_samples == 9 and len(spec.space.grid()) == 9


def test_run_config_drops_inactive_values_and_validates(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE))
    cfg = spec.run_config({"temperature": 2.0, "kd_weight": None})
    assert cfg.method_params == {"temperature": 2.0} and cfg.epochs == 16
    with pytest.raises(ConfigError, match=r"\(trial\): temperature: must be > 0, but got -1.0"):
        spec.run_config({"temperature": -1})


def test_a_misspelt_shared_parameter_is_one_problem(tmp_path: Path) -> None:
    space = {**CONDITIONAL["space"], "temprature": {"type": "float", "low": 1, "high": 4}}
    problems = problems_of(write(tmp_path, {**CONDITIONAL, "space": space}))
    assert problems == [f"{tmp_path / 'space.yaml'}: space.temprature: unknown hyperparameter for methods 'none', "
                        f"'kd', 'dkd'; did you mean 'temperature'? (none takes: nothing; kd takes: temperature, "
                        f"ce_weight, kd_weight, logit_stand, reverse_kl; dkd takes: alpha, beta, temperature, warmup, "
                        f"ce_weight, kd_weight, logit_stand; or a run setting such as lr)"]


# --------------------------------------------------------------------------- a searched sampler

KDAS_SEARCH = {
    "name": "kdas-compare",
    "fixed": {"dataset": "digits", "teacher": "resnet20", "student": "resnet8", "method": "kd", "epochs": 12},
    "space": {"sampler": {"type": "categorical", "choices": {
        "none": {},
        "kdas": {"start_rate": {"type": "float", "low": 0.6, "high": 0.9},
                 "end_rate": {"type": "float", "low": 0.2, "high": 0.6}}}},
        "temperature": {"type": "float", "low": 1, "high": 8, "log": True}},
}


def _kdas(**sub: dict) -> dict:
    return {**KDAS_SEARCH["space"], "sampler": {"type": "categorical", "choices": {"none": {}, **sub}}}


def test_sampler_spec_resolves_and_every_trial_is_a_valid_run(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, KDAS_SEARCH))
    assert list(spec.space.samplers) == ["none", "kdas"] and "sampler" not in spec.fixed
    assert spec.space.names() == ["sampler", "start_rate", "end_rate", "temperature"]
    assert spec.resolved["space"]["sampler"]["choices"]["none"] == {}
    cfg = spec.run_config({"sampler": "kdas", "start_rate": 0.8, "end_rate": 0.3, "temperature": 2.0})
    assert (cfg.sampler, cfg.sampler_params, cfg.method_params) == (
        "kdas", {"start_rate": 0.8, "end_rate": 0.3}, {"temperature": 2.0})
    cfg = spec.run_config({"sampler": "none", "start_rate": None, "end_rate": None, "temperature": 2.0})
    assert (cfg.sampler, cfg.sampler_params) == ("none", {})
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        spec.space.suggest(trial)
        spec.run_config(trial.params)
    for _, config in generate_variants(spec.space.to_tune(), random_state=np.random.default_rng(0)):
        assert spec.run_config(config).sampler == config["sampler"]


def test_method_and_sampler_may_both_be_searched(tmp_path: Path) -> None:
    space = {**CONDITIONAL["space"], "method": {"type": "categorical", "choices": {
        k: v for k, v in CONDITIONAL["space"]["method"]["choices"].items() if k != "none"}},
        "sampler": KDAS_SEARCH["space"]["sampler"]}
    spec = load_spec(write(tmp_path, {**CONDITIONAL, "space": space, "search": {"algorithm": "random"}}))
    assert list(spec.space.conditionals) == ["method", "sampler"]
    for _, config in generate_variants(spec.space.to_tune(), random_state=np.random.default_rng(1)):
        cfg = spec.run_config(config)
        assert (cfg.method, cfg.sampler) == (config["method"], config["sampler"])
    # method none cannot take KDAS (it needs teacher-student disagreement): reported, naming the pairing
    space["method"] = CONDITIONAL["space"]["method"]
    problems = problems_of(write(tmp_path, {**CONDITIONAL, "space": space}))
    assert [p for p in problems if "space.sampler:" in p and "(in trials of method 'none' with sampler "
            "'kdas')" in p], "\n".join(problems)


@pytest.mark.parametrize("change, expected", [
    ({"space": _kdas(kdsa={})}, "space.sampler.choices.kdsa: unknown sampler 'kdsa'; did you mean 'kdas'?"),
    ({"space": {**_kdas(kdas={"beta": {"type": "float", "low": 1, "high": 8}}), "temperature": None}},
     "space.sampler.choices.kdas.beta: unknown hyperparameter for sampler 'kdas' (kdas takes: start_rate, "),
    ({"space": {"sampler": _kdas(kdas={"temperature": {"type": "float", "low": 1, "high": 8}})["sampler"]}},
     "space.sampler.choices.kdas.temperature: unknown hyperparameter for sampler 'kdas' (kdas takes: "
     "start_rate, end_rate, sampling_period, exclusion_rate, penalty_factor, penalty_lambda, penalty_warmup, "
     "kdas_warmup, threshold; or a run setting such as lr); it is a hyperparameter of methods"),
    ({"space": _kdas(kdas={"end_rate": {"type": "float", "low": 0.2, "high": 1.5}})},
     "space.sampler.choices.kdas.end_rate.high: end_rate: must be in (0, 1], but got 1.5"),
    ({"space": _kdas(kdas={"end_rate": {"type": "float", "low": 0.2, "high": 0.95}})},
     "space.sampler.choices.kdas.end_rate.high: end_rate: must be <= start_rate, but got end_rate=0.95"),
    ({"fixed": {**KDAS_SEARCH["fixed"], "sampler": "kdas"}},
     "fixed.sampler: must be left out when space.sampler searches it, but got 'kdas'"),
    ({"space": {**KDAS_SEARCH["space"], "threshold": {"type": "float", "low": 0.1, "high": 0.3}}},
     "space.threshold: searched for every sampler, but sampler 'none' takes no threshold; search it under "
     "space.sampler.choices.<sampler> for the samplers that take it"),
])
def test_sampler_spec_problems(tmp_path: Path, change: dict, expected: str) -> None:
    content = {**KDAS_SEARCH, **change}
    content["space"] = {k: v for k, v in content["space"].items() if v is not None}
    problems = problems_of(write(tmp_path, content))
    assert any(p.startswith(f"{tmp_path / 'space.yaml'}: {expected}") for p in problems), "\n".join(problems)


def test_a_sampler_parameter_searched_while_the_sampler_is_fixed_to_none_is_reported(tmp_path: Path) -> None:
    space = {"start_rate": {"type": "float", "low": 0.6, "high": 0.9}}
    problems = problems_of(write(tmp_path, {**BASE, "space": space}))
    assert any("space.start_rate.low: start_rate: unknown key; it is a hyperparameter of sampler 'kdas'" in p
               for p in problems), "\n".join(problems)


def test_grid_over_samplers_counts_every_pairing(tmp_path: Path) -> None:
    space = {"sampler": {"type": "categorical", "choices": {
        "none": {}, "kdas": {"start_rate": {"type": "categorical", "choices": [0.6, 0.8]},
                             "sampling_period": {"type": "categorical", "choices": [1, 2, "1,2,3,4"]}}}},
        "temperature": {"type": "categorical", "choices": [2, 4]}}
    spec = load_spec(write(tmp_path, {**KDAS_SEARCH, "space": space, "search": {"algorithm": "grid"}}))
    assert spec.num_samples == (1 + 2 * 3) * 2 == len(spec.space.grid())
    for point in spec.space.grid():
        spec.run_config(point)


# --------------------------------------------------------------------------- several objectives (search.objectives)

OBJECTIVES = {"val/acc1": "max", "samples/backprop": "min"}
MULTI = {**BASE, "search": {"objectives": OBJECTIVES}}
OBJECTIVE_NAMES = "val/acc1, val/acc5, val/loss, train/loss, samples/backprop, samples/scored, time_total_s"
MULTI_BROKEN = [  # (overrides, the one line expected)
    (["search.objectives={val/acc1: max}"],
     "--set search.objectives={val/acc1: max}: search.objectives: needs two or more metrics, each with max or min, "
     "such as {val/acc1: max, samples/backprop: min} (for one, set search.metric and search.mode), but got "
     "{'val/acc1': 'max'}"),
    (["search.objectives=[val/acc1, samples/backprop]"],
     "--set search.objectives=[val/acc1, samples/backprop]: search.objectives: expected a mapping of metrics to max "
     "or min, such as {val/acc1: max, samples/backprop: min}, but got ['val/acc1', 'samples/backprop']"),
    (["search.objectives={val/acc1: max, samples/backward: min}"],
     "--set search.objectives={val/acc1: max, samples/backward: min}: search.objectives.samples/backward: unknown "
     f"metric; did you mean 'samples/backprop'? (objectives take: {OBJECTIVE_NAMES})"),
    (["search.objectives={val/acc1: maximize, samples/backprop: min}"],
     "--set search.objectives={val/acc1: maximize, samples/backprop: min}: search.objectives.val/acc1: must be one "
     "of max, min, but got 'maximize'"),
    (["search.objectives={samples/backprop: min, time_total_s: min}"],
     "--set search.objectives={samples/backprop: min, time_total_s: min}: search.objectives: needs one of val/acc1, "
     "val/acc5, val/loss, train/loss (what the trial learned, to set its cost against), but got only "
     "samples/backprop, time_total_s"),
    (["scheduler.type=asha"],
     "--set scheduler.type=asha: scheduler.type: must be none with search.objectives (early stopping ranks trials by "
     "one metric, and a stopped trial's cost counts fewer epochs), but got 'asha'"),
    (["scheduler.type=hyperband"],
     "--set scheduler.type=hyperband: scheduler.type: must be none with search.objectives (early stopping ranks "
     "trials by one metric, and a stopped trial's cost counts fewer epochs), but got 'hyperband'"),
    (["scheduler.type=median"],
     "--set scheduler.type=median: scheduler.type: must be none with search.objectives (early stopping ranks trials "
     "by one metric, and a stopped trial's cost counts fewer epochs), but got 'median'"),
    (["scheduler.type=pbt", "search.algorithm=random"],
     "--set scheduler.type=pbt: scheduler.type: must be none with search.objectives (PBT ranks trials by one metric "
     "and copies the strong ones' weights over the weak ones'), but got 'pbt'"),
    (["search.metric=val/loss"],
     "--set search.metric=val/loss: search.metric: must be one of the metrics of search.objectives (val/acc1, "
     "samples/backprop), or left out, but got 'val/loss'"),
    (["search.mode=min"],
     "--set search.mode=min: search.mode: must be left out with search.objectives, or be val/acc1's direction there "
     "(max), but got 'min'"),
    (["confirm.top_k=2"],
     "--set confirm.top_k=2: confirm.top_k: must be 0 with search.objectives (a Pareto front has no top k; re-run a "
     "front trial with kdtune train --from-search FOLDER --trial ID --seeds N), but got 2"),
    (["search.warm_start=ray_results/old"],
     "--set search.warm_start=ray_results/old: search.warm_start: must be unset with search.objectives (an earlier "
     "study's trials carry one value, this study needs one per objective), but got 'ray_results/old'"),
    (["search.objectives={val/acc1: max, samples/scored: min}"],
     "--set search.objectives={val/acc1: max, samples/scored: min}: search.objectives.samples/scored: needs sampler "
     "kdas in every trial (only KDAS scores samples), but got sampler 'none'"),
]


def test_objectives_resolve_with_the_first_metric_as_the_search_metric(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MULTI))
    assert spec.objectives == (("val/acc1", "max"), ("samples/backprop", "min"))
    assert (spec.metric, spec.mode) == ("val/acc1", "max")
    # no early stopping: every trial trains all its epochs
    assert (spec.scheduler, spec.planned_trial_epochs()) == ("none", 32 * 16)
    assert spec.resolved["search"] == {"algorithm": "tpe", "num_samples": 32, "metric": "val/acc1", "mode": "max",
                                       "seed": 0, "max_concurrent": None, "objectives": OBJECTIVES}
    assert spec.resolved["scheduler"]["type"] == "none"
    assert json.loads(json.dumps(spec.resolved)) == spec.resolved
    # a single-objective search has none (and its resolved spec no key for them)
    single = load_spec(write(tmp_path, BASE))
    assert single.objectives == ()
    assert "objectives" not in single.resolved["search"]


def test_the_search_metric_is_the_first_objective_of_what_a_trial_learned(tmp_path: Path) -> None:
    # written by a program with its keys sorted: the cost first, and still val/acc1 is the metric
    sorted_keys = write(tmp_path, yaml.safe_dump(MULTI, sort_keys=True))
    assert load_spec(sorted_keys).objectives == (("val/acc1", "max"), ("samples/backprop", "min"))
    # search.metric (and mode, if given, its direction) picks among several such objectives
    three = {"samples/backprop": "min", "val/acc1": "max", "val/loss": "min"}
    spec = load_spec(write(tmp_path, {**BASE, "search": {"objectives": three, "metric": "val/loss", "mode": "min"}}))
    assert spec.objectives == (("val/loss", "min"), ("samples/backprop", "min"), ("val/acc1", "max"))
    assert (spec.metric, spec.mode) == ("val/loss", "min") and list(spec.resolved["search"]["objectives"]) == [
        "val/loss", "samples/backprop", "val/acc1"]


@pytest.mark.parametrize("overrides", [["search.algorithm=random"], ["search.algorithm=gp"], ["scheduler.type=none"],
                                       ["search.algorithm=grid", "space.temperature={type: categorical, choices: [2, 4]}",
                                        "space.kd_weight={type: categorical, choices: [1, 2]}"],
                                       ["search.objectives={val/acc1: max, time_total_s: min, samples/backprop: min}"]])
def test_objectives_go_with_every_algorithm(tmp_path: Path, overrides: list[str]) -> None:
    spec = load_spec(write(tmp_path, MULTI), overrides)
    assert spec.objectives[0] == ("val/acc1", "max") and len(spec.objectives) >= 2 and spec.scheduler == "none"
    assert spec.trials == (4 if spec.algorithm == "grid" else 32)


def test_samples_scored_needs_kdas_in_every_trial(tmp_path: Path) -> None:
    scored = {"val/acc1": "max", "samples/scored": "min"}
    spec = load_spec(write(tmp_path, {**KDAS_SEARCH, "fixed": {**KDAS_SEARCH["fixed"], "sampler": "kdas"},
                                      "space": {"start_rate": {"type": "float", "low": 0.6, "high": 0.9}},
                                      "search": {"objectives": scored}}))
    assert spec.objectives[1] == ("samples/scored", "min")
    problems = problems_of(write(tmp_path, {**KDAS_SEARCH, "search": {"objectives": scored}}))
    assert problems == [f"{tmp_path / 'space.yaml'}: search.objectives.samples/scored: needs sampler kdas in every "
                        f"trial (only KDAS scores samples), but got sampler 'none'"]


# --------------------------------------------------------------------------- pbt and pb2

PBT = {**BASE, "search": {"algorithm": "random", "num_samples": 4}, "scheduler": {"type": "pbt"}}
PBT_BROKEN = [  # (overrides, the one line expected)
    (["search.algorithm=tpe"],
     "--set search.algorithm=tpe: search.algorithm: must be random with scheduler.type pbt (the population starts at "
     "random and then evolves by copying and mutating), but got 'tpe'"),
    (["scheduler.perturbation_interval=16"],
     "--set scheduler.perturbation_interval=16: scheduler.perturbation_interval: must be < fixed.epochs (16): a "
     "trial is exploited between epochs, but got 16"),
    (["scheduler.quantile_fraction=0.75"],
     "--set scheduler.quantile_fraction=0.75: scheduler.quantile_fraction: must be in (0, 0.5] (the bottom fraction "
     "copies the top one), but got 0.75"),
    (["scheduler.resample_probability=2"],
     "--set scheduler.resample_probability=2: scheduler.resample_probability: must be in [0, 1], but got 2.0"),
    (["scheduler.type=pb2", "scheduler.resample_probability=0.5"],
     "--set scheduler.resample_probability=0.5: scheduler.resample_probability: applies to pbt only (PB2 picks new "
     "values with its Gaussian-process bandit)"),
    (["scheduler.mutate=[kd_weight, temprature]"],
     "--set scheduler.mutate=[kd_weight, temprature]: scheduler.mutate: 'temprature' is not searched; did you "
     "mean 'temperature'? (searched: temperature, kd_weight)"),
    (["space.batch_size={type: int, low: 32, high: 128}", "scheduler.mutate=[batch_size]"],
     "--set scheduler.mutate=[batch_size]: scheduler.mutate: 'batch_size' cannot change mid-run: a run setting a "
     "checkpoint fixes (mutable ones: lr, momentum, weight_decay, lr_min, lr_decay_rate)"),
    (["search.max_concurrent=2"],
     "--set search.max_concurrent=2: search.max_concurrent: must be unset with scheduler.type pbt (paused trials "
     "count against it), but got 2; the resources per trial limit how many run at once"),
    (["confirm.top_k=2"],
     "--set confirm.top_k=2: confirm.top_k: must be 0 with scheduler.type pbt (a trial's result comes from its "
     "mutation history, which re-running one configuration does not reproduce), but got 2"),
    (["scheduler.type=asha", "scheduler.mutate=[temperature]"],
     "--set scheduler.mutate=[temperature]: scheduler.mutate: applies to scheduler.type pbt and pb2 only, but the type is "
     "'asha'"),
]


ONE_LINE = [("objectives", MULTI, o, e) for o, e in MULTI_BROKEN] + [("pbt", PBT, o, e) for o, e in PBT_BROKEN]


@pytest.mark.parametrize("base, overrides, expected", [case[1:] for case in ONE_LINE],
                         ids=[f"{name}: {' '.join(o)}" for name, _, o, _ in ONE_LINE])
def test_broken_objectives_and_pbt_settings_are_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              base: dict, overrides: list[str], expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, base)
    assert problems_of(Path("space.yaml"), overrides) == [expected]


def test_pbt_mutates_every_searched_parameter_that_can_change_mid_run(tmp_path: Path) -> None:
    space = {**BASE["space"], "batch_size": {"type": "int", "low": 32, "high": 128, "step": 32}}
    spec = load_spec(write(tmp_path, {**PBT, "space": space}))
    assert spec.scheduler == "pbt" and spec.mutate == ("temperature", "kd_weight")  # not batch_size
    assert spec.perturbation_interval == 4  # a quarter of 16 epochs
    assert spec.resolved["scheduler"]["mutate"] == ["temperature", "kd_weight"]
    # other schedulers' resolved specs (and their --resume checks) keep their keys
    assert set(load_spec(write(tmp_path, BASE)).resolved["scheduler"]) == {"type", "grace_period", "reduction_factor"}
    pb2 = load_spec(write(tmp_path, {**PBT, "scheduler": {"type": "pb2", "perturbation_interval": 2}}))
    assert pb2.scheduler == "pb2" and pb2.perturbation_interval == 2 and pb2.resample_probability is None


def test_pbt_refuses_a_space_with_sub_spaces(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, {**CONDITIONAL, "search": {"algorithm": "random"},
                                            "scheduler": {"type": "pbt"}}))
    assert any("scheduler.type pbt needs one fixed set of parameters" in p for p in problems), problems


def test_pbt_mutations_stay_in_the_space() -> None:
    from kdtune.search.pbt import WithinSpace
    from kdtune.search.space import Param

    explore = WithinSpace([Param("lr", "float", 0.01, 0.2, log=True), Param("warmup", "int", 0, 10),
                           Param("temperature", "float", 1.0, 8.0, step=0.5)])
    assert explore({"lr": 0.24, "warmup": 3.6, "temperature": 0.8}) == {"lr": 0.2, "warmup": 4, "temperature": 1.0}
    assert explore({"lr": 0.05, "warmup": -2, "temperature": 4.3}) == {"lr": 0.05, "warmup": 0, "temperature": 4.5}
    assert explore({"lr": None}) == {"lr": None}  # an inactive value stays unset


def test_pbt_builds_tunes_scheduler_counting_epochs(tmp_path: Path) -> None:
    # (PB2 is built by the same function; importing it costs seconds of scikit-learn, so it is left out)
    from ray.tune.schedulers import PopulationBasedTraining

    from kdtune.search.schedulers import TIME_ATTR, build_scheduler

    pbt = build_scheduler(load_spec(write(tmp_path, PBT)))
    assert type(pbt) is PopulationBasedTraining and pbt._time_attr == TIME_ATTR
    assert pbt._perturbation_interval == 4 and set(pbt._hyperparam_mutations) == {"temperature", "kd_weight"}
