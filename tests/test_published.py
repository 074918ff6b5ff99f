"""Published accuracies as package data (kdtune/published.yaml): their values, the comparison of a
search's best trial with them (analysis.baseline_gap) and the report's wording (test vs val)."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from kdtune import analysis
from kdtune.analysis import loaders, report
from kdtune.analysis.published import label, published_for, published_results, variant

ROOT = Path(__file__).resolve().parents[1]
# CTKD's README table (issue 17): teacher -> student: (KD, KD + CTKD)
CTKD_README = {("resnet56", "resnet20"): (70.66, 71.19), ("resnet110", "resnet32"): (73.08, 73.52),
               ("resnet110", "resnet20"): (70.66, 70.99), ("wrn_40_2", "wrn_16_2"): (74.92, 75.45),
               ("wrn_40_2", "wrn_40_1"): (73.54, 73.93), ("vgg13", "vgg8"): (72.98, 73.52)}


def test_ctkd_readme_table() -> None:
    table = published_results().query("source == 'ctkd'")
    assert len(table) == 12
    for (teacher, student), (kd, ctkd) in CTKD_README.items():
        rows = table[(table.teacher == teacher) & (table.student == student)].set_index("method")["acc1"]
        assert rows.to_dict() == {"kd": kd, "ctkd": ctkd}


def test_every_number_has_a_source_and_is_a_percentage() -> None:
    table = published_results()
    assert table["acc1"].between(50, 100).all() and set(table["dataset"]) == {"cifar100", "imagenet"}
    assert table["title"].str.len().gt(10).all() and table["url"].str.startswith("https://github.com/").all()
    assert not table.duplicated(["source", "teacher", "student", "method"]).any()
    # kd_methods.md's tables, one value per table row and source
    assert published_for("resnet32x4", "resnet8x4", "kd+ls")["acc1"].tolist() == [76.62]
    assert published_for("wrn_40_2", "wrn_16_2", "dkd").set_index("source")["acc1"].to_dict() == \
        {"mdistiller": 76.23, "ls": 76.24}  # the two READMEs differ in the last digit
    assert published_for("ResNet50", "MobileNetV2", "dkd+ls")["acc1"].tolist() == [70.45]
    assert published_for("resnet32x4", "ShuffleV2", "kd")["acc1"].tolist() == [74.45, 74.45]
    kdas = published_for("vgg13", "vgg8", "kd+ls+kdas").iloc[0]
    assert (kdas["acc1"], kdas["time_change"], kdas["source"]) == (74.63, -12.6, "kdas")
    assert published_for("anything", "vgg8", "none")["acc1"].tolist() == [70.36]  # the student alone
    assert math.isnan(published_for("vgg13", "vgg8", "kd")["time_change"].iloc[0])


def test_imagenet_rows_are_apart() -> None:
    """The seeds' ImageNet pairs (mdistiller and CTKD READMEs), under kdtune's torchvision names, found
    only when asked for ImageNet."""
    assert published_for("tv_resnet34", "tv_resnet18", "kd", "imagenet").set_index("source")["acc1"].to_dict() == \
        {"mdistiller-imagenet": 71.03, "ctkd-imagenet": 70.83}
    assert published_for("tv_resnet34", "tv_resnet18", "dkd", "imagenet")["acc1"].tolist() == [71.70]
    assert published_for("tv_resnet50", "MobileNetV1", "dkd", "imagenet")["acc1"].tolist() == [72.05]
    assert published_for("tv_resnet34", "tv_resnet18", "kd").empty  # the default dataset is cifar100
    assert published_for(None, "tv_resnet18", "none", "imagenet")["acc1"].tolist() == [70.26]


def test_variant_names_what_a_trial_ran() -> None:
    assert variant("kd") == "kd" and variant("kd", True, "kdas") == "kd+ls+kdas"
    assert variant("ctkd", math.nan, None) == "ctkd" and variant("dkd", "True") == "dkd+ls"
    assert label("ctkd") == "KD + CTKD" and label("sakd") == "sakd"


def trials() -> pd.DataFrame:
    rows = [  # search, trial, status, method, logit_stand, sampler, objective (last-epoch val acc), teacher, student
        ("ctkd-vgg", "t1", "completed", "ctkd", False, "none", 73.4, "vgg13", "vgg8"),
        ("ctkd-vgg", "t2", "completed", "ctkd", True, "none", 72.0, "vgg13", "vgg8"),
        ("kdas-vgg", "t3", "completed", "kd", True, "kdas", 74.0, "vgg13", "vgg8"),
        ("digits", "t4", "completed", "dkd", False, "none", 99.0, "resnet20", "resnet8"),
    ]
    columns = ["search", "trial_id", "status", "method", "logit_stand", "sampler", "final_val/acc1", "teacher",
               "student"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.assign(dataset=["cifar100"] * 3 + ["digits"])


def test_baseline_gap_compares_the_best_trial_with_the_published_numbers() -> None:
    gap = analysis.baseline_gap(trials())
    ctkd = gap[gap.search == "ctkd-vgg"]
    assert set(ctkd["best_trial"]) == {"t1"}  # the best trial, and its method (ctkd without LS)
    published = ctkd[ctkd.baseline.str.startswith("published")]
    assert sorted(zip(published.baseline, published.baseline_value)) == [
        ("published ctkd", 73.52), ("published ctkd", 73.52),  # CTKD's README and LS's
        ("published kd", 72.98), ("published kd", 72.98), ("published kd", 72.98),  # mdistiller, CTKD, LS
        ("published none", 70.36)]
    assert sorted(published["gap"].round(2)) == [-0.12, -0.12, 0.42, 0.42, 0.42, 3.04]  # 73.4 - each
    assert published["source"].str.endswith(", test set").all() and published["baseline_trial"].isna().all()
    assert published["source"].str.contains("CTKD README").any()
    kdas = gap[(gap.search == "kdas-vgg") & (gap.baseline == "published kd+ls+kdas")]
    assert kdas["baseline_value"].tolist() == [74.63] and kdas["gap"].round(2).tolist() == [-0.63]
    assert not gap[gap.search == "digits"].baseline.str.startswith("published").any()  # nothing published
    assert not analysis.baseline_gap(trials(), published=False).baseline.str.startswith("published").any()
    losses = trials().rename(columns={"final_val/acc1": "final_val/loss"})
    assert not analysis.baseline_gap(losses, metric="val/loss", mode="min").baseline.str.startswith(
        "published").any()  # published numbers are accuracies


def test_trials_carry_the_pair_from_the_spec() -> None:
    spec = {"space": {"temperature": {"type": "float", "low": 1, "high": 8}},
            "fixed": {"dataset": "cifar100", "teacher": "vgg13", "student": "vgg8", "method": "ctkd"},
            "search": {"metric": "val/acc1"}, "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}}
    raw = pd.DataFrame({"trial_id": ["a"], "status": ["completed"], "temperature": [2.0], "best_val/acc1": [73.0]})
    tidy = loaders._tidy_trials(raw, spec, "s")
    assert tidy.loc[0, ["dataset", "teacher", "student", "method"]].tolist() == ["cifar100", "vgg13", "vgg8", "ctkd"]
    assert list(tidy.columns[:4]) == ["search", "trial_id", "status", "temperature"]


@pytest.mark.filterwarnings("ignore:parameter importance")  # two trials: expected
def test_report_says_published_numbers_are_test_set(tmp_path: Path) -> None:
    spec = {"name": "ctkd-vgg", "space": {"temperature_lr_scale": {"type": "categorical", "choices": [0.1, 1.0]}},
            "fixed": {"dataset": "cifar100", "teacher": "vgg13", "student": "vgg8", "method": "ctkd", "epochs": 240},
            "search": {"algorithm": "tpe", "metric": "val/acc1", "mode": "max"},
            "scheduler": {"type": "none"}, "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}}
    raw = pd.DataFrame({"trial_id": ["a", "b"], "status": ["completed"] * 2, "temperature_lr_scale": [0.1, 1.0],
                        "best_val/acc1": [73.4, 72.0], "final_val/acc1": [73.0, 71.5], "epochs": [240, 240],
                        "wall_s": [3600.0, 3600.0], "samples_backprop": [1e7, 1e7]})
    curves = pd.DataFrame({"search": "ctkd-vgg", "trial_id": ["a", "a", "b", "b"], "status": "completed",
                           "epoch": [1, 240] * 2, "wall_s": [15.0, 3600.0] * 2, "val/acc1": [10.0, 73.0, 9.0, 71.5]})
    search = analysis.Search("ctkd-vgg", "ctkd-vgg", spec, loaders._tidy_trials(raw, spec, "ctkd-vgg"), curves)
    # no importance intervals: 30 fANOVA resamples of two trials (2 s of CPU) are nothing this test
    # reads (tests/test_analysis.py checks the intervals)
    written = report.write_report([search], tmp_path, bootstrap=0)
    md = written["md"].read_text()
    assert ("ctkd-vgg: published KD + CTKD 73.52 (CTKD README; LS README), KD 72.98 (mdistiller README; CTKD README; "
            "LS README), student alone 70.36 (CRD/DKD papers); this search's best 73.00 on val.") in md
    assert "Published numbers are test-set accuracies" in md and "measured on the validation split" in md
    assert "KD 72.98 (mdistiller README" in written["html"].read_text()


@pytest.mark.slow
def test_the_numbers_install_with_the_package(tmp_path: Path) -> None:
    # built from a copy: setuptools writes build/ and kdtune.egg-info/ beside setup.cfg
    src = tmp_path / "src"
    shutil.copytree(ROOT / "kdtune", src / "kdtune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("kdtune-*.whl"))
    assert "kdtune/published.yaml" in zipfile.ZipFile(wheel).namelist()
