from __future__ import annotations

import math
import pickle
from collections import Counter
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.samplers import RandomSampler
from optuna.trial import FixedTrial
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.variant_generator import generate_variants

from kdtune.search.space import MAX_GRID, Param, Space, parse_param, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

N = 2000
# Every kind of range, and a conditional method whose sub-spaces share a name (temperature).
SPACE = {
    "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.9},
    "lr_decay_rate": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1},
    "batch_size": {"type": "int", "low": 8, "high": 512, "log": True},
    "warmup_epochs": {"type": "int", "low": 0, "high": 3},
    "seed": {"type": "int", "low": 0, "high": 30, "step": 5},  # low on the step's grid
    "split_seed": {"type": "int", "low": 1, "high": 31, "step": 10},  # low off it
    "schedule": {"type": "categorical", "choices": ["step", "cosine", "constant"]},
    "method": {"type": "categorical", "choices": {
        "none": {},
        "kd": {"temperature": {"type": "float", "low": 1, "high": 8, "log": True},
               "logit_stand": {"type": "categorical", "choices": [False, True]}},
        "dkd": {"temperature": {"type": "float", "low": 2, "high": 6, "log": True},
                "beta": {"type": "int", "low": 1, "high": 10}},
    }},
}


def _space(raw: dict = SPACE) -> Space:
    space, problems = parse_space(raw)
    assert problems == []
    return space


def optuna_samples(space: Space, n: int = N, seed: int = 0) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        assert space.suggest(trial) is None
        out.append(trial.params)
    return out


def tune_samples(space: Space, n: int = N, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    domains = space.to_tune()
    return [config for _ in range(n) for _, config in generate_variants(domains, random_state=rng)]


@pytest.fixture(scope="module")
def samples() -> dict[str, list[dict[str, Any]]]:
    space = _space()
    return {"optuna": optuna_samples(space), "tune": tune_samples(space)}


def _values(configs: list[dict], name: str, method: str | None = None) -> list[Any]:
    return [c[name] for c in configs
            if c.get(name) is not None and (method is None or c["method"] == method)]


@pytest.mark.parametrize("source", ["optuna", "tune"])
def test_every_value_is_in_its_range_on_its_step_with_its_type(samples: dict, source: str) -> None:
    space = _space()
    for method, sub in [(None, space.params), *space.methods.items()]:
        for name, p in sub.items():
            values = _values(samples[source], name, method)
            assert values, (name, method)
            if p.kind == "categorical":
                assert set(values) <= set(p.choices)
                continue
            assert all(p.low - 1e-12 <= v <= p.high + 1e-12 for v in values), (name, source)
            if p.kind == "int":
                assert all(type(v) is int for v in values), name
                assert all((v - p.low) % (p.step or 1) == 0 for v in values), name
            if p.step is not None and p.kind == "float":
                ratios = [(v - p.low) / p.step for v in values]
                assert all(abs(r - round(r)) < 1e-9 for r in ratios), name


@pytest.mark.parametrize("source", ["optuna", "tune"])
def test_int_bounds_are_inclusive_and_every_grid_value_comes_up(samples: dict, source: str) -> None:
    configs = samples[source]
    assert set(_values(configs, "warmup_epochs")) == {0, 1, 2, 3}
    assert set(_values(configs, "seed")) == {0, 5, 10, 15, 20, 25, 30}
    assert set(_values(configs, "split_seed")) == {1, 11, 21, 31}
    assert set(_values(configs, "beta", "dkd")) == set(range(1, 11))
    assert sorted({round(v, 9) for v in _values(configs, "lr_decay_rate")}) == [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.mark.parametrize("source", ["optuna", "tune"])
def test_log_and_linear_scales_put_the_median_at_the_midpoint(samples: dict, source: str) -> None:
    configs = samples[source]
    for name, method, low, high in [("lr", None, 0.001, 0.1), ("batch_size", None, 8, 512),
                                    ("temperature", "kd", 1, 8), ("temperature", "dkd", 2, 6)]:
        logs = np.log(_values(configs, name, method))
        mid, width = (math.log(low) + math.log(high)) / 2, math.log(high) - math.log(low)
        assert abs(np.median(logs) - mid) < 0.05 * width, (name, method, source)
    momentum = _values(configs, "momentum")
    assert abs(np.median(momentum) - 0.7) < 0.05 * 0.4
    # a log scale would put the median of a linear range well below its midpoint, and vice versa
    assert abs(np.median(_values(configs, "lr")) - 0.0505) > 0.03


@pytest.mark.parametrize("source", ["optuna", "tune"])
def test_categorical_choices_and_methods_come_up_uniformly(samples: dict, source: str) -> None:
    configs = samples[source]
    for name, method, k in [("method", None, 3), ("schedule", None, 3), ("logit_stand", "kd", 2),
                            ("seed", None, 7), ("split_seed", None, 4)]:
        counts = Counter(_values(configs, name, method))
        n = sum(counts.values())
        assert len(counts) == k
        assert all(abs(c - n / k) < 0.25 * n / k for c in counts.values()), (name, counts)


def test_conditional_parameters_exist_only_in_their_methods_trials(samples: dict) -> None:
    always = {"lr", "momentum", "lr_decay_rate", "batch_size", "warmup_epochs", "seed", "split_seed", "schedule"}
    own = {"none": set(), "kd": {"temperature", "logit_stand"}, "dkd": {"temperature", "beta"}}
    for params in samples["optuna"]:  # Optuna: absent from trial.params
        assert set(params) == {"method"} | always | own[params["method"]]
    conditional = {"temperature", "logit_stand", "beta"}
    for config in samples["tune"]:  # Tune: every key present, None where inactive
        assert set(config) == {"method"} | always | conditional
        active = {k for k in conditional if config[k] is not None}
        assert active == own[config["method"]]


def test_fixed_trial_drives_suggest_exactly() -> None:
    space = _space()
    values = {"lr": 0.01, "momentum": 0.9, "lr_decay_rate": 0.3, "batch_size": 64, "warmup_epochs": 3,
              "seed": 5, "split_seed": 31, "schedule": "cosine"}
    trial = FixedTrial({**values, "method": "dkd", "temperature": 4.0, "beta": 8, "logit_stand": True})
    space.suggest(trial)
    assert trial.params == {**values, "method": "dkd", "temperature": 4.0, "beta": 8}
    trial = FixedTrial({**values, "method": "none", "temperature": 4.0})
    space.suggest(trial)
    assert trial.params == {**values, "method": "none"}


def test_unconditional_space_translates_without_method() -> None:
    space = _space({"kd_weight": {"type": "float", "low": 0.5, "high": 2}})
    assert space.methods is None and space.names() == ["kd_weight"]
    assert set(space.to_tune()) == {"kd_weight"}
    assert set(optuna_samples(space, 3)[0]) == {"kd_weight"}


def test_seeded_tune_generator_is_reproducible_and_resolves_conditionals() -> None:
    domains = _space().to_tune()

    def draw(seed: int) -> list[dict]:
        generator = BasicVariantGenerator(random_state=seed)
        generator.add_configurations({"x": {"run": _noop, "config": domains, "num_samples": 12}})
        return [generator.next_trial().config for _ in range(12)]

    first = draw(3)
    assert first == draw(3) and first != draw(4)
    assert all((c["beta"] is None) == (c["method"] != "dkd") for c in first)


def _noop(config: dict) -> None:
    pass


def test_translations_pickle() -> None:
    space = _space()
    suggest = pickle.loads(pickle.dumps(space.suggest))  # OptunaSearch pickles its space
    assert optuna_samples(Space(), 1) == [{}] and suggest.__self__ == space
    domains = pickle.loads(pickle.dumps(space.to_tune()))
    config = next(iter(generate_variants(domains, random_state=0)))[1]
    assert config["method"] in ("none", "kd", "dkd")


def test_names_list_every_key_a_trial_may_hold_once() -> None:
    assert _space().names() == ["method", "temperature", "logit_stand", "beta", "lr", "momentum",
                                "lr_decay_rate", "batch_size", "warmup_epochs", "seed", "split_seed", "schedule"]


def test_grid_expands_each_method_with_its_own_parameters() -> None:
    space = _space({"schedule": {"type": "categorical", "choices": ["step", "cosine"]},
                    "method": {"type": "categorical", "choices": {
                        "none": None,
                        "kd": {"temperature": {"type": "categorical", "choices": [2, 4, 8]}},
                        "dkd": {"warmup": {"type": "int", "low": 0, "high": 20, "step": 10},
                                "alpha": {"type": "float", "low": 0.5, "high": 1.0, "step": 0.25}}}}})
    grid = space.grid()
    assert len(grid) == 2 + 2 * 3 + 2 * 3 * 3
    assert {"method": "none", "schedule": "cosine"} in grid
    assert {"method": "kd", "schedule": "step", "temperature": 8} in grid
    assert {"method": "dkd", "schedule": "step", "warmup": 20, "alpha": 0.75} in grid
    assert all(set(p) == {"method", "schedule"} for p in grid if p["method"] == "none")
    assert len({tuple(sorted(p.items())) for p in grid}) == len(grid)


def test_grid_refuses_float_ranges_and_huge_grids() -> None:
    with pytest.raises(ValueError, match="kd_weight: a float range has no values to enumerate"):
        _space({"kd_weight": {"type": "float", "low": 0.5, "high": 2}}).grid()
    with pytest.raises(ValueError, match=f"at most {MAX_GRID}"):
        _space({"seed": {"type": "int", "low": 0, "high": 20_000}}).grid()
    with pytest.raises(ValueError, match=f"at most {MAX_GRID}"):
        _space({"a": {"type": "int", "low": 0, "high": 200}, "b": {"type": "int", "low": 0, "high": 200}}).grid()
    assert len(_space({"seed": {"type": "int", "low": 0, "high": 9}}).grid()) == 10


@pytest.mark.parametrize("raw, expected", [
    ({"type": "float", "low": 8, "high": 1}, ["space.x.low: must be <= high, but got low=8.0, high=1.0"]),
    ({"type": "float", "low": 0, "high": 1, "log": True}, ["space.x.low: must be > 0 when log is true, but got 0.0"]),
    ({"type": "int", "low": 1.5, "high": 4}, ["space.x.low: expected an integer, but got 1.5"]),
    ({"type": "int", "low": 0, "high": 10, "step": 3},
     ["space.x.step: high - low must be a multiple of step, but got low=0, high=10, step=3"]),
    ({"type": "int", "low": 0, "high": 10, "step": 0}, ["space.x.step: must be >= 1, but got 0"]),
    ({"type": "float", "low": 0.001, "high": 1, "log": True, "step": 0.1},
     ["space.x.step: cannot be combined with log: true (Optuna has no stepped log scale), but got step=0.1"]),
    ({"type": "int", "low": 1, "high": 9, "log": True, "step": 2}, ["space.x.step: cannot be combined with log"]),
    ({"type": "categorical", "choices": []}, ["space.x.choices: must be a non-empty list, but got []"]),
    ({"type": "categorical", "choices": [1, 1.0]},
     ["space.x.choices[1]: must not repeat choices[0], but got 1.0"]),
    ({"type": "categorical", "choices": [1, None]},
     ["space.x.choices[1]: must be a string, a number or true/false, but got None"]),
    ({"type": "float", "low": 1, "hihg": 2},
     ["space.x.hihg: unknown key; did you mean 'high'? (type float takes: type, low, high, log, step)",
      "space.x.high: missing; a float parameter needs low and high"]),
    ({"type": "floaty", "low": 1, "high": 2},
     ["space.x.type: must be one of float, int, categorical, but got 'floaty'"]),
    ({"low": 1, "high": 2}, ["space.x.type: must be one of float, int, categorical, but got None (missing)"]),
    ({"type": "float", "low": "abc", "high": 1}, ["space.x.low: expected a number, but got 'abc'"]),
    ({"type": "float", "low": 1, "high": 2, "log": "yes"}, ["space.x.log: expected true or false, but got 'yes'"]),
    ({"type": "categorical", "choices": [1, 2], "low": 1},
     ["space.x.low: unknown key (type categorical takes: type, choices)"]),
    (0.5, ["space.x: expected a mapping such as {type: float, low: 0.1, high: 1.0}, but got 0.5"]),
])
def test_param_problems_name_the_yaml_path_and_the_value(raw: Any, expected: list[str]) -> None:
    param, problems = parse_param("x", raw, "space.x")
    assert param is None
    assert len(problems) == len(expected)
    for problem, text in zip(problems, expected):
        assert str(problem).startswith(text), problem


def test_numbers_written_as_strings_are_numbers() -> None:
    param, problems = parse_param("lr", {"type": "float", "low": "1e-4", "high": "1e-2", "log": True}, "space.lr")
    assert problems == [] and param == Param("lr", "float", 1e-4, 1e-2, log=True)
    param, _ = parse_param("lr", {"type": "categorical", "choices": ["1e-4", "1e-3", "cosine"]}, "space.lr")
    assert param.choices == (1e-4, 1e-3, "cosine")


def test_param_validates_when_built_directly() -> None:
    with pytest.raises(ValueError, match="low: must be <= high, but got low=2, high=1"):
        Param("x", "int", 2, 1)
    with pytest.raises(ValueError, match="kind: must be one of float, int, categorical"):
        Param("x", "bool")
    assert Param("x", "categorical", choices=[1, 2]).choices == (1, 2)


@pytest.mark.parametrize("method, expected", [
    ({"type": "categorical", "choices": {"kd": {"temperature": {"type": "float", "low": 1, "high": 8, "log": True}},
                                         "dkd": {"temperature": {"type": "categorical", "choices": [2, 3]}}}},
     "space.method.choices.dkd.temperature: Optuna keeps one distribution per name, so it must be float with "
     "log: true as under 'kd', but got categorical with choices [2, 3]"),
    ({"type": "categorical", "choices": {"kd": {"temperature": {"type": "float", "low": 1, "high": 8, "log": True}},
                                         "dkd": {"temperature": {"type": "float", "low": 1, "high": 8}}}},
     "space.method.choices.dkd.temperature: Optuna keeps one distribution per name, so it must be float with "
     "log: true as under 'kd', but got float with log: false"),
    ({"type": "categorical", "choices": {"kd": {"logit_stand": {"type": "categorical", "choices": [False, True]}},
                                         "dkd": {"logit_stand": {"type": "categorical", "choices": [True]}}}},
     "space.method.choices.dkd.logit_stand: Optuna keeps one distribution per name"),
    ({"type": "categorical", "choices": {"kd": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}},
     "space.method.choices.kd.lr: also searched for every method at space.lr; keep one of them"),
    ({"type": "float", "low": 1, "high": 2}, "space.method: the method is searched as {type: categorical"),
    ({"type": "categorical", "choices": []}, "space.method.choices: expected a mapping of method names"),
    ({"type": "categorical", "choices": {"kd": {"method": {"type": "categorical", "choices": ["kd"]}}}},
     "space.method.choices.kd.method: a method's sub-space cannot search the method"),
])
def test_conditional_space_problems(method: dict, expected: str) -> None:
    _, problems = parse_space({"method": method, "lr": {"type": "float", "low": 0.01, "high": 0.1}})
    assert any(str(p).startswith(expected) for p in problems), problems


def test_methods_may_be_listed_without_sub_spaces_and_round_trip() -> None:
    space = _space({"method": {"type": "categorical", "choices": ["none", "kd"]}})
    assert space.methods == {"none": {}, "kd": {}}
    full = _space()
    assert parse_space(full.to_dict()) == (full, [])


def test_tune_conditionals_wait_for_the_method_whatever_the_key_order() -> None:
    domains = _space({"method": SPACE["method"]}).to_tune()
    reordered = {name: domains[name] for name in reversed(domains)}  # "method" last
    for seed in range(20):
        config = next(iter(generate_variants(reordered, random_state=seed)))[1]
        assert (config["beta"] is not None) == (config["method"] == "dkd")


# --------------------------------------------------------------------------- a searched sampler

KDAS_SPACE = {
    "method": {"type": "categorical", "choices": {
        "kd": {"temperature": {"type": "float", "low": 1, "high": 8, "log": True}},
        "dkd": {"beta": {"type": "int", "low": 1, "high": 10}}}},
    "sampler": {"type": "categorical", "choices": {
        "none": {},
        "kdas": {"start_rate": {"type": "float", "low": 0.6, "high": 0.9},
                 "end_rate": {"type": "float", "low": 0.2, "high": 0.6},
                 "sampling_period": {"type": "categorical", "choices": [1, 2, "1,2,3,4"]}}}},
    "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
}
KDAS_PARAMS = {"start_rate", "end_rate", "sampling_period"}
OWN_METHOD = {"kd": {"temperature"}, "dkd": {"beta"}}


def test_sampler_is_parsed_as_its_own_conditional() -> None:
    space = _space(KDAS_SPACE)
    assert list(space.conditionals) == ["method", "sampler"]
    assert list(space.methods) == ["kd", "dkd"] and list(space.samplers) == ["none", "kdas"]
    assert set(space.samplers["kdas"]) == KDAS_PARAMS and space.samplers["none"] == {}
    assert space.names() == ["method", "sampler", "temperature", "beta", "start_rate", "end_rate",
                             "sampling_period", "lr"]
    assert parse_space(space.to_dict()) == (space, [])
    only = _space({"sampler": KDAS_SPACE["sampler"]})
    assert only.methods is None and list(only.conditionals) == ["sampler"]
    assert only.names() == ["sampler", "start_rate", "end_rate", "sampling_period"]
    listed = _space({"sampler": {"type": "categorical", "choices": ["none", "kdas"]}})
    assert listed.samplers == {"none": {}, "kdas": {}}
    paths = [(path, parent) for path, parent, _ in space.entries()]
    assert ("space.sampler.choices.kdas.end_rate", ("sampler", "kdas")) in paths
    assert ("space.method.choices.kd.temperature", ("method", "kd")) in paths


def test_fixed_trial_drives_the_sampler_conditional() -> None:
    space = _space(KDAS_SPACE)
    kdas = {"start_rate": 0.7, "end_rate": 0.3, "sampling_period": 2}
    trial = FixedTrial({"method": "kd", "temperature": 4.0, "beta": 3, "sampler": "kdas", **kdas, "lr": 0.05})
    space.suggest(trial)
    assert trial.params == {"method": "kd", "temperature": 4.0, "sampler": "kdas", **kdas, "lr": 0.05}
    trial = FixedTrial({"method": "dkd", "beta": 3, "sampler": "none", **kdas, "lr": 0.05})
    space.suggest(trial)
    assert trial.params == {"method": "dkd", "beta": 3, "sampler": "none", "lr": 0.05}


def test_sampler_parameters_exist_only_in_kdas_trials_in_both_translations() -> None:
    space = _space(KDAS_SPACE)
    optuna_draws, tune_draws = optuna_samples(space, 600), tune_samples(space, 600)
    for params in optuna_draws:
        expected = {"method", "sampler", "lr"} | OWN_METHOD[params["method"]]
        assert set(params) == expected | (KDAS_PARAMS if params["sampler"] == "kdas" else set())
    conditional = {"temperature", "beta"} | KDAS_PARAMS
    for config in tune_draws:
        assert set(config) == {"method", "sampler", "lr"} | conditional
        active = {k for k in conditional if config[k] is not None}
        own = OWN_METHOD[config["method"]] | (KDAS_PARAMS if config["sampler"] == "kdas" else set())
        assert active == own, config
    for draws in (optuna_draws, tune_draws):  # independent choices: every pairing comes up evenly
        pairs = Counter((d["method"], d["sampler"]) for d in draws)
        assert len(pairs) == 4 and all(abs(c - 150) < 0.3 * 150 for c in pairs.values()), pairs
        kdas = [d for d in draws if d["sampler"] == "kdas"]
        assert all(0.6 <= d["start_rate"] <= 0.9 and 0.2 <= d["end_rate"] <= 0.6 for d in kdas)
        assert {d["sampling_period"] for d in kdas} == {1, 2, "1,2,3,4"}
        for name, mid, width in (("start_rate", 0.75, 0.3), ("end_rate", 0.4, 0.4)):
            assert abs(np.median([d[name] for d in kdas]) - mid) < 0.1 * width, name


def test_tune_sampler_conditionals_wait_for_the_sampler_whatever_the_key_order() -> None:
    domains = _space(KDAS_SPACE).to_tune()
    assert domains["start_rate"].parent == "sampler" and domains["beta"].parent == "method"
    reordered = {name: domains[name] for name in reversed(domains)}  # "method", "sampler" last
    for seed in range(20):
        config = next(iter(generate_variants(reordered, random_state=seed)))[1]
        assert (config["end_rate"] is not None) == (config["sampler"] == "kdas")
        assert (config["beta"] is not None) == (config["method"] == "dkd")
    generator = BasicVariantGenerator(random_state=1)
    generator.add_configurations({"x": {"run": _noop, "config": pickle.loads(pickle.dumps(domains)),
                                        "num_samples": 10}})
    configs = [generator.next_trial().config for _ in range(10)]
    assert all((c["start_rate"] is None) == (c["sampler"] != "kdas") for c in configs)


def test_grid_is_the_product_of_methods_and_samplers() -> None:
    space = _space({
        "method": {"type": "categorical", "choices": {
            "kd": {"temperature": {"type": "categorical", "choices": [2, 4]}}, "none": {}}},
        "sampler": {"type": "categorical", "choices": {
            "none": {}, "kdas": {"start_rate": {"type": "categorical", "choices": [0.6, 0.8]},
                                 "sampling_period": {"type": "int", "low": 1, "high": 3}}}},
        "schedule": {"type": "categorical", "choices": ["step", "cosine"]}})
    grid = space.grid()
    # (kd: 2 temperatures, none: 1) x (none: 1, kdas: 2 x 3) x 2 schedules
    assert len(grid) == (2 + 1) * (1 + 6) * 2
    assert len({tuple(sorted(p.items())) for p in grid}) == len(grid)
    assert {"method": "none", "sampler": "none", "schedule": "step"} in grid
    assert {"method": "kd", "sampler": "kdas", "temperature": 4, "start_rate": 0.8, "sampling_period": 3,
            "schedule": "cosine"} in grid
    for point in grid:
        assert ("start_rate" in point) == (point["sampler"] == "kdas")
        assert ("temperature" in point) == (point["method"] == "kd")


@pytest.mark.parametrize("sampler, expected", [
    ({"type": "float", "low": 1, "high": 2}, "space.sampler: the sampler is searched as {type: categorical"),
    ({"type": "categorical", "choices": []}, "space.sampler.choices: expected a mapping of sampler names"),
    ({"type": "categorical", "choices": {"kdas": {"sampler": {"type": "categorical", "choices": ["kdas"]}}}},
     "space.sampler.choices.kdas.sampler: a sampler's sub-space cannot search the sampler"),
    ({"type": "categorical", "choices": {"kdas": {"method": {"type": "categorical", "choices": ["kd"]}}}},
     "space.sampler.choices.kdas.method: a sampler's sub-space cannot search the method; search it at "
     "space.method"),
    ({"type": "categorical", "choices": {"kdas": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}},
     "space.sampler.choices.kdas.lr: also searched for every sampler at space.lr; keep one of them"),
    ({"type": "categorical", "choices": {"kdas": {"temperature": {"type": "float", "low": 1, "high": 4}}}},
     "space.sampler.choices.kdas.temperature: also searched under space.method.choices; keep one of them"),
    ({"type": "categorical", "choices": {"kdas": {"end_rate": {"type": "float", "low": 0.2, "high": 0.6}},
                                         "other": {"end_rate": {"type": "float", "low": 0.2, "high": 0.6,
                                                                "log": True}}}},
     "space.sampler.choices.other.end_rate: Optuna keeps one distribution per name"),
])
def test_conditional_sampler_space_problems(sampler: dict, expected: str) -> None:
    _, problems = parse_space({"method": {"type": "categorical", "choices": {
        "kd": {"temperature": {"type": "float", "low": 1, "high": 8}}}},
        "sampler": sampler, "lr": {"type": "float", "low": 0.01, "high": 0.1}})
    assert any(str(p).startswith(expected) for p in problems), problems


def test_a_param_stands_for_its_optuna_distribution() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = _space()
    assert space.params["lr"].distribution == FloatDistribution(0.001, 0.1, log=True)
    assert space.params["lr_decay_rate"].distribution == FloatDistribution(0.1, 0.5, step=0.1)
    assert space.params["split_seed"].distribution == IntDistribution(1, 31, step=10)
    assert space.params["warmup_epochs"].distribution == IntDistribution(0, 3)
    assert space.params["schedule"].distribution == CategoricalDistribution(["step", "cosine", "constant"])
    # the trials Optuna draws (define-by-run) hold the same distributions
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    trial = study.ask()
    space.suggest(trial)
    for name, dist in trial.distributions.items():
        assert dist == space.declared()[name].distribution, name


def test_optunas_rules_become_problems_at_the_key() -> None:
    # Optuna's constructor finds these (one per parameter: its first); kdtune says them at the key
    _, problems = parse_param("x", {"type": "int", "low": 0, "high": 8, "log": True}, "space.method.choices.kd.x")
    assert [str(p) for p in problems] == ["space.method.choices.kd.x.low: must be >= 1 when log is true, but got 0"]
    # Optuna stops at the first rule broken; every one is reported, each at its key
    _, problems = parse_param("x", {"type": "float", "low": 8, "high": 1, "log": True, "step": 2}, "space.x")
    assert [str(p) for p in problems] == [
        "space.x.low: must be <= high, but got low=8.0, high=1.0",
        "space.x.step: cannot be combined with log: true (Optuna has no stepped log scale), but got step=2.0"]
    _, problems = parse_param("x", {"type": "float", "low": -8, "high": -9, "log": True}, "space.x")
    assert [p.path for p in problems] == ["space.x.low", "space.x.low"]  # above high, and not > 0
    # the rule Optuna lacks (it lowers high, with a warning): refused
    _, problems = parse_param("x", {"type": "float", "low": 0.1, "high": 1.0, "step": 0.2}, "space.x")
    assert [str(p) for p in problems] == ["space.x.step: high - low must be a multiple of step, but got low=0.1, "
                                          "high=1.0, step=0.2"]
    assert parse_param("x", {"type": "float", "low": 0.1, "high": 0.9, "step": 0.2}, "space.x")[1] == []
