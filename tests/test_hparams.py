"""The hyperparameter schema: declared once, inherited, read by validation, the listing and the docs' table."""
from __future__ import annotations

from typing import Any

import pytest

from kdtune import listing
from kdtune.config import ConfigError, RunConfig, validate
from kdtune.distillers import METHODS, build_distiller
from kdtune.distillers.kd import KD
from kdtune.hparams import NO_VALUE, Problem, Schema, did_you_mean, hp, render
from kdtune.models import build_model
from kdtune.sampling import SAMPLERS

def _pair():
    return build_model("resnet8", num_classes=10, in_channels=1), build_model("resnet8", num_classes=10, in_channels=1)


def test_listing_covers_every_method_and_sampler_hyperparameter() -> None:
    table = listing.markdown()
    for registry in (METHODS, SAMPLERS):
        for name in registry.names():
            for key, entry in registry.hparams(name).items():
                assert f"`{key}`" in table and entry.help, (name, key)  # every entry has a description
    assert "| method `kd` | `temperature` | float | 4 | > 0 |" in table
    assert "| sampler `kdas` | `start_rate` | float | 0.6 | in (0, 1] |" in table


def test_subclasses_inherit_and_drop_without_restating() -> None:
    kd, dkd = METHODS.hparams("kd"), METHODS.hparams("dkd")
    ctkd, ctkd_dkd = METHODS.hparams("ctkd"), METHODS.hparams("ctkd_dkd")
    assert "temperature" not in ctkd and "temperature" not in ctkd_dkd  # learned, not set
    assert set(kd.names()) - {"temperature"} <= set(ctkd.names())  # logit_stand, reverse_kl, ... kept
    assert set(dkd.names()) - {"temperature"} <= set(ctkd_dkd.names())
    assert ctkd["t_end"] == ctkd_dkd["t_end"]  # one declaration shared by both
    assert ctkd["ce_weight"].default == 0.1 and ctkd_dkd["ce_weight"].default == 1.0  # each parent's
    # the feature methods: feat_weight's default is their loss's weight, options are the loss's
    assert METHODS.hparams("at")["feat_weight"].default == 1000.0 and "p" in METHODS.hparams("at")
    assert METHODS.hparams("rkd").names() == ["ce_weight", "feat_weight", "distance_weight", "angle_weight"]


class _Ramp(KD):  # not registered: the registries stay as shipped
    hparams = Schema(ramp=hp(0.5, ge=0, le=1, help="a ramp"))

    @classmethod
    def check(cls, params: dict[str, Any]) -> list[Problem]:
        return [Problem("ramp", "must be 1 with logit_stand", params["ramp"])] if params["logit_stand"] and params["ramp"] != 1 else []


def test_a_subclass_keeps_its_parents_hyperparameters_and_checks() -> None:
    assert _Ramp.hparams.names() == [*KD.hparams.names(), "ramp"]
    d = _Ramp(*_pair(), ramp=1.0, logit_stand=True, reverse_kl=True)
    assert (d.ramp, d.logit_stand, d.reverse_kl, d.temperature) == (1.0, True, True, 4.0)
    _, problems = _Ramp.problems({"temperature": 0, "ramp": 2, "logit_stand": True})
    assert [str(p) for p in problems] == ["temperature: must be > 0, but got 0.0",
                                          "ramp: must be in [0, 1], but got 2.0",
                                          "ramp: must be 1 with logit_stand, but got 2.0"]


def test_signature_parameters_are_hyperparameters_positional_or_not() -> None:
    class Positional(KD):
        def __init__(self, student, teacher, gamma=0.5, *, beta: int = 3, **kw: Any) -> None:
            super().__init__(student, teacher, **kw)
            self.gamma_, self.beta_ = gamma, beta

    assert Positional.hparams.names()[-2:] == ["gamma", "beta"]
    assert "logit_stand" in Positional.hparams  # **kw hides nothing
    assert Positional.hparams["beta"].types == (int,)
    d = Positional(*_pair(), gamma=0.25, beta=4, logit_stand=True)
    assert (d.gamma_, d.beta_, d.logit_stand) == (0.25, 4, True)
    with pytest.raises(TypeError, match="'gamma' has no default"):
        class Required(KD):  # noqa: F841
            def __init__(self, student, teacher, *, gamma: float) -> None:
                super().__init__(student, teacher)


def test_unknown_or_bad_constructor_hyperparameters_are_refused() -> None:
    with pytest.raises(TypeError, match="no hyperparameter 'temprature'; did you mean 'temperature'"):
        build_distiller("kd", *_pair(), temprature=2.0)
    with pytest.raises(ValueError, match="temperature: must be > 0"):
        build_distiller("kd", *_pair(), temperature=-1)
    with pytest.raises(ValueError, match="breaks its own rule"):
        hp(-1.0, ge=0, help="x")
    with pytest.raises(TypeError, match="needs type="):
        hp(None, help="x")
    with pytest.raises(TypeError, match="would hide nn.Module.train"):
        class Clash(KD):  # noqa: F841
            hparams = Schema(train=hp(1.0, help="x"))


def test_validation_returns_structured_problems_rendered_once() -> None:
    _, problems = validate({"method": "kd", "temperature": "hot", "kd_weight": -1, "sampler": "kdaz"})
    by_path = {p.path: p for p in problems}
    assert by_path["temperature"].rule == "expected a number" and by_path["temperature"].value == "hot"
    assert by_path["kd_weight"].rule == "must be >= 0" and by_path["kd_weight"].value == -1.0
    assert by_path["sampler"].value is NO_VALUE and "did you mean 'kdas'" in by_path["sampler"].rule
    lines = render(problems, "run.yaml")
    assert "run.yaml: kd_weight: must be >= 0, but got -1.0" in lines
    assert render([by_path["kd_weight"].under("fixed")], "s.yaml") == ["s.yaml: fixed.kd_weight: must be >= 0, but got -1.0"]
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "kd", "temperature": "hot", "kd_weight": -1}, "run.yaml")
    assert e.value.problems == ["run.yaml: temperature: expected a number, but got 'hot'",
                                "run.yaml: kd_weight: must be >= 0, but got -1.0"]


def test_one_did_you_mean() -> None:
    assert did_you_mean("temprature", ["temperature", "beta"]) == "; did you mean 'temperature'?"
    assert did_you_mean("xyz", ["temperature"]) == ""


def test_defaults_are_the_constructors() -> None:
    # One declaration: what validation reports as the default is what a built method uses.
    for method in ("kd", "dkd", "ctkd", "at", "fitnet", "rkd", "cc"):
        d = build_distiller(method, *_pair(), input_shape=(1, 8, 8))
        for key, entry in METHODS.hparams(method).items():
            assert getattr(d, key) == entry.default, (method, key)
    k = SAMPLERS.build("kdas")
    assert (k.start_rate, k.end_rate, k.periods) == (0.6, 0.4, (1, 3, 5, 10))


def test_unquoted_on_and_off_mean_the_choices() -> None:
    """PyYAML reads `teacher_cache: off` as false; for an on/off setting that is the choice "off"."""
    import yaml

    values, problems = validate(yaml.safe_load("teacher_cache: off\ncompile: on\nmethod: kd"))
    assert not problems and values["teacher_cache"] == "off" and values["compile"] == "on"
    _, problems = validate({"schedule": False})  # a string setting without on/off: still a type error
    assert [p.rule for p in problems] == ["must be one of step, cosine, constant"]


def test_declared_dataclass_fields_are_a_schema() -> None:
    from dataclasses import dataclass, field

    from kdtune.hparams import declare

    @dataclass(frozen=True)
    class Settings:
        size: int = declare(3, ge=1, help="how many")
        names: list = declare([], help="which", not_searchable="a list")
        root: str = declare("~", path=True, help="where")

    schema = Schema.of(Settings)
    assert schema.names() == ["size", "names", "root"] and schema.defaults() == {"size": 3, "names": [], "root": "~"}
    assert Settings().names is not Settings().names  # a mutable default is a fresh copy per instance
    assert schema["root"].path and schema["names"].not_searchable == "a list"

    @dataclass
    class Undeclared:
        size: int = field(default=3)

    with pytest.raises(TypeError, match="Undeclared.size: declare it with declare"):
        Schema.of(Undeclared)


def test_range_reasons_required_keys_and_choices_in_messages() -> None:
    share = hp(0.0, ge=0, le=1, why="a share of one GPU", help="GPUs per trial")
    assert [str(p) for p in share.validate(2, "gpus")[1]] == ["gpus: must be in [0, 1] (a share of one GPU), but got 2.0"]
    name = hp(None, type=str, required=True, help="the name")
    assert name.types == (str,) and [str(p) for p in name.validate(None, "name")[1]] == \
        ["name: expected a string, but got None"]
    mode = hp("max", choices=("max", "min"), help="direction")
    assert [str(p) for p in mode.validate(1, "mode")[1]] == ["mode: must be one of max, min, but got 1"]
    assert [str(p) for p in hp(1.0, help="x").validate(float("nan"), "x")[1]] == ["x: expected a finite number, but got nan"]
