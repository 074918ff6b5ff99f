from __future__ import annotations

import pytest

from kdtune.config import ConfigError, RunConfig, parse_override


def test_flat_keys_split_into_recipe_and_method_params() -> None:
    cfg = RunConfig.from_dict({"method": "dkd", "beta": 2, "lr": "1e-2", "epochs": 10,
                               "lr_decay_epochs": [100, 200]})
    assert cfg.method_params == {"beta": 2.0}
    assert cfg.lr == 0.01 and isinstance(cfg.lr, float)
    assert cfg.recipe().lr_decay_epochs == (100, 200)
    assert cfg.flat()["beta"] == 2.0 and "method_params" not in cfg.flat()


def test_every_problem_is_reported_at_once_with_key_and_value() -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "kd", "temprature": 4, "epochs": "many", "lr": -1,
                             "student": "resnet8x5", "beta": 2, "logit_stand": "yes"}, "run.yaml")
    problems = e.value.problems
    text = "\n".join(problems)
    assert "run.yaml: temprature: unknown key; did you mean 'temperature'?" in text
    assert "run.yaml: epochs: expected an integer, but got 'many'" in text
    assert "run.yaml: lr: must be > 0, but got -1.0" in text
    assert "run.yaml: student: unknown model 'resnet8x5'; did you mean 'resnet8x4'?" in text
    assert "beta: unknown key" in text and "method 'kd' takes: temperature" in text
    assert "logit_stand: expected true or false, but got 'yes'" in text
    assert len(problems) == 6


def test_method_range_checks_and_unknown_method() -> None:
    with pytest.raises(ConfigError, match="temperature: must be > 0, but got 0.0"):
        RunConfig.from_dict({"method": "kd", "temperature": 0})
    with pytest.raises(ConfigError, match="unknown method 'kdd'; did you mean 'kd'"):
        RunConfig.from_dict({"method": "kdd"})


def test_missing_teacher_checkpoint_is_reported(tmp_path) -> None:
    with pytest.raises(ConfigError, match="teacher_checkpoint: file not found"):
        RunConfig.from_dict({"teacher_checkpoint": str(tmp_path / "x.pth")})


def test_baseline_needs_no_teacher() -> None:
    assert RunConfig.from_dict({"method": "none", "teacher": None}).teacher is None
    with pytest.raises(ConfigError, match="needs a teacher"):
        RunConfig.from_dict({"method": "kd", "teacher": None})


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("logit_stand=true") == ("logit_stand", True)
    assert parse_override("lr_decay_epochs=[1, 2]") == ("lr_decay_epochs", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_every_run_key_is_declared_once_with_help_and_the_recipe_is_the_engines() -> None:
    from dataclasses import fields

    from kdtune.config import RUN_KEYS
    from kdtune.engine import RECIPE, Recipe

    assert list(RUN_KEYS) == [f.name for f in fields(RunConfig)]
    assert all(entry.help for _, entry in RUN_KEYS.items())
    assert all(RUN_KEYS[name] == RECIPE[name] for name in RECIPE)  # taken from Recipe, not declared again
    assert RunConfig().recipe() == Recipe() and RECIPE.defaults() == {f.name: getattr(Recipe(), f.name)
                                                                      for f in fields(Recipe)}
    cfg = RunConfig.from_dict({"lr": 0.1, "schedule": "cosine", "lr_decay_epochs": [2, 3]})
    assert cfg.recipe() == Recipe(lr=0.1, schedule="cosine", lr_decay_epochs=(2, 3))
    # the defaults each declaration shows are the dataclass's (a computed one, cache_dir, aside)
    assert {k: v for k, v in RUN_KEYS.defaults().items() if k != "cache_dir"} == \
        {k: v for k, v in RunConfig().__dict__.items() if k != "cache_dir"}


@pytest.mark.parametrize("values, expected", [
    ({"seed": -1}, "seed: must be >= 0, but got -1"),
    ({"device": "gpu"}, "device: must be auto or a torch device such as cpu, cuda or cuda:1, but got 'gpu'"),
    ({"lr": float("inf")}, "lr: expected a finite number, but got inf"),
    ({"lr_min": 0.1}, "lr_min: must be in [0, lr), but got 0.1"),  # the recipe's own rule across its keys
    ({"amp": "yes"}, "amp: expected true or false or null, but got 'yes'"),
    ({"dataset_options": [1]}, "dataset_options: expected a mapping, but got [1]"),
])
def test_each_run_key_is_checked_by_its_declaration(values: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(values, "run.yaml")
    assert e.value.problems == [f"run.yaml: {expected}"]
