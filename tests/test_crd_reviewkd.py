"""CRD and ReviewKD: against the released code (goldens), CRD's negatives and memory, the shapes
ReviewKD builds for the release's pairs, learning on digits and exact resume."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from kdtune.config import ConfigError, RunConfig
from kdtune.distillers import METHODS, build_distiller
from kdtune.distillers.reviewkd import hcl_loss
from kdtune.engine import Engine, Recipe
from kdtune.models import build_model
from kdtune.run import build_engine
from learning import assert_learns

sys.path.insert(0, str(Path(__file__).parent / "tools"))
from goldens_crd import TinyNet  # noqa: E402
from goldens_reviewkd import TinyConvNet, digest  # noqa: E402

DATA = Path(__file__).parent / "data"
CRD_REF = json.loads((DATA / "reference_crd.json").read_text())
REVIEW_REF = json.loads((DATA / "reference_reviewkd.json").read_text())


def _t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _close(got: torch.Tensor, want, rel: float = 1e-4, abs_: float = 1e-6) -> None:
    """Within ``rel`` of each value, or ``abs_``, or 2e-5 of the tensor's largest value: a gradient
    element sums terms as large as the largest elements, so its noise on another CPU's kernels
    scales with them (ReviewKD's pooled-feature gradient: 4.4e-5 off at -0.289, with elements of
    11.8, on AVX-512 against the reference's values)."""
    want = _t(want)
    torch.testing.assert_close(got.detach().float(), want, rtol=rel,
                               atol=max(abs_, 2e-5 * want.abs().max().item()) if want.numel() else abs_)


def test_goldens_name_the_reference_commits() -> None:
    for ref in (CRD_REF, REVIEW_REF):
        sources = ref["_meta"]["sources"]
        assert "megvii-research/mdistiller" in sources
        assert all(len(sha) == 40 and int(sha, 16) >= 0 for sha in sources.values())


def test_methods_are_registered_and_read_teacher_features() -> None:
    crd, review = METHODS.get("crd"), METHODS.get("reviewkd")
    assert not crd.teacher_logits_only and not review.teacher_logits_only
    assert crd.needs_indices and not getattr(review, "needs_indices", False)
    assert crd.unweighted_terms == review.unweighted_terms == ("ce",)  # both per sample: KDAS reweights


# ----------------------------------------------------------------------------- CRD


def _toy_crd(**kw):
    toy = CRD_REF["toy"]
    student = TinyNet(6, toy["s_dim"], toy["num_classes"])
    teacher = TinyNet(6, toy["t_dim"], toy["num_classes"])
    d = build_distiller("crd", student, teacher, input_shape=(6,), feat_dim=toy["feat_dim"], nce_k=toy["nce_k"],
                        nce_temperature=toy["nce_temperature"], nce_momentum=toy["nce_momentum"],
                        ce_weight=toy["ce_weight"], feat_weight=toy["feat_weight"], **kw)
    d.bind_train_set(_t(CRD_REF["labels"], torch.long))
    init = CRD_REF["initial"]
    d.memory_s.copy_(_t(init["memory_s"]))
    d.memory_t.copy_(_t(init["memory_t"]))
    for name in ("embed_s", "embed_t"):  # mdistiller's Embed keeps its layer as .linear too
        getattr(d, name).load_state_dict({k: _t(v) for k, v in init[name].items()})
    return d


def test_crd_loss_gradient_constants_and_memory_equal_mdistillers_over_two_batches() -> None:
    d = _toy_crd()
    for i, ref in enumerate(CRD_REF["batches"]):
        f_s = _t(ref["f_s"]).requires_grad_(True)
        rows = _t(ref["rows"], torch.long)
        per_sample = d.contrastive(f_s, _t(ref["f_t"]), rows[:, 0], rows[:, 1:])
        assert per_sample.shape == (len(rows),)
        per_sample.mean().backward()
        assert per_sample.mean().item() == pytest.approx(ref["loss"], rel=1e-5), i
        _close(f_s.grad, ref["grad_f_s"])
        _close(d.normalizers, ref["normalizers"], rel=1e-5)  # set by batch 0, kept by batch 1
        _close(d.memory_s, ref["memory_s"])
        _close(d.memory_t, ref["memory_t"])


def test_crd_training_step_equals_mdistillers() -> None:
    ref = CRD_REF["step"]
    d = _toy_crd()
    d.student.load_state_dict({k: _t(v) for k, v in ref["student"].items()})
    d.teacher.load_state_dict({k: _t(v) for k, v in ref["teacher"].items()})
    rows = _t(ref["rows"], torch.long)
    d.draw_negatives = lambda y: rows[:, 1:]  # the stored draw of the release's sampler
    d.train()
    optimizer = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=ref["lr"],
                                momentum=ref["momentum"], weight_decay=ref["weight_decay"])
    _, losses = d(_t(ref["x"]), _t(ref["y"], torch.long), indices=rows[:, 0])
    assert set(losses) == {"ce", "crd"} and all(v.shape == (8,) for v in losses.values())
    assert losses["ce"].mean().item() == pytest.approx(ref["loss_ce"], rel=1e-5)
    assert losses["crd"].mean().item() == pytest.approx(ref["loss_crd"], rel=1e-5)
    optimizer.zero_grad()
    sum(v.mean() for v in losses.values()).backward()
    optimizer.step()
    for module, want in ((d.student, ref["student_after"]), (d.embed_s, ref["embed_s_after"]),
                         (d.embed_t, ref["embed_t_after"])):
        for k, v in module.state_dict().items():
            _close(v, want[k])
    _close(d.memory_s, ref["memory_s"])
    _close(d.memory_t, ref["memory_t"])
    _close(d.normalizers, ref["normalizers"], rel=1e-5)


def _bound(labels: torch.Tensor, nce_k: int):
    d = build_distiller("crd", TinyNet(6, 12, 4), TinyNet(6, 10, 4), input_shape=(6,), nce_k=nce_k, feat_dim=4)
    d.bind_train_set(labels)
    return d


@pytest.mark.parametrize("nce_k, mode", [(20, "without"), (65, "mixed"), (95, "with")])
def test_crd_negatives_are_other_class_images_distinct_where_the_release_draws_them_so(nce_k, mode) -> None:
    # 4 classes of 10, 20, 30 and 40 images: 90, 80, 70, 60 negatives each
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([10, 20, 30, 40])])[torch.randperm(100)]
    d = _bound(labels, nce_k)
    assert d.sampling == mode and d.num_data == 100 and d.memory_s.shape == (100, 4)
    y = torch.arange(4).repeat(50)
    neg = d.draw_negatives(y)
    assert neg.shape == (200, nce_k) and neg.dtype == torch.long
    assert (labels[neg] != y[:, None]).all()  # never the anchor's class
    distinct = torch.tensor([len(set(row.tolist())) == nce_k for row in neg])
    others = 100 - torch.bincount(labels)[y]
    # the release: without replacement when the class has at least k negatives, with it otherwise
    assert distinct[others >= nce_k].all()
    if (others < nce_k).any():
        assert not distinct[others < nce_k].all()
    # uniform over the other classes' images: each is drawn about as often
    counts = torch.bincount(neg[y == 3].flatten(), minlength=100)[labels != 3].float()
    assert counts.std() / counts.mean() < 0.35


def test_crd_negatives_come_from_the_default_generator() -> None:
    d = _bound(torch.arange(50) % 5, nce_k=8)
    y = torch.arange(5)
    torch.manual_seed(3)
    first = d.draw_negatives(y)
    torch.manual_seed(3)
    assert torch.equal(first, d.draw_negatives(y))  # what the engine's checkpoint restores (torch_rng/cuda_rng)
    assert not torch.equal(first, d.draw_negatives(y))


def test_crd_needs_the_indices_and_a_bound_training_set() -> None:
    student, teacher = TinyNet(6, 12, 4), TinyNet(6, 10, 4)
    d = build_distiller("crd", student, teacher, input_shape=(6,))
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="bind_train_set"):
        d(x, y, indices=torch.arange(3))
    d.bind_train_set(torch.arange(30) % 4)
    with pytest.raises(ValueError, match="training-set indices"):
        d(x, y)
    with pytest.raises(ValueError, match="two classes"):
        d.bind_train_set(torch.zeros(30, dtype=torch.long))


def test_the_engine_sizes_crds_memory_from_the_split_it_trains_on(digits) -> None:
    for final, n in ((False, len(digits.train)), (True, len(digits.train) + len(digits.val))):
        d = build_distiller("crd", build_model("resnet8", num_classes=10, in_channels=1),
                            build_model("resnet8", num_classes=10, in_channels=1), input_shape=(1, 8, 8), nce_k=64)
        Engine(d, digits, Recipe(epochs=1), final=final)
        assert d.num_data == n and d.memory_t.shape == (n, 128)
        assert "memory_s" in d.trainable_state_dict() and "normalizers" in d.trainable_state_dict()


# ----------------------------------------------------------------------------- ReviewKD


def _tiny_pair(pair: dict) -> tuple[TinyConvNet, TinyConvNet]:
    student = TinyConvNet(1, pair["student_widths"], pair["student_strides"], 5)
    teacher = TinyConvNet(1, pair["teacher_widths"], pair["teacher_strides"], 5)
    student.load_state_dict({k: _t(v) for k, v in pair["student"].items()})
    teacher.load_state_dict({k: _t(v) for k, v in pair["teacher"].items()})
    return student, teacher


def _load_abfs(d, pair: dict) -> None:
    """The release keeps its ABFs deepest first (``abfs.0`` on the pooled feature); kdtune shallow first."""
    n = len(d.abfs)
    state = {}
    for key, v in pair["abfs"].items():
        _, j, rest = key.split(".", 2)
        state[f"{n - 1 - int(j)}.{rest}"] = torch.tensor(v)
    d.abfs.load_state_dict(state)


def _review(student, teacher, **kw):
    return build_distiller("reviewkd", student, teacher, input_shape=(1, 8, 8), feat_weight=REVIEW_REF["feat_weight"],
                           warmup=REVIEW_REF["warmup"], ce_weight=REVIEW_REF["ce_weight"], **kw)


class _Fixed(torch.nn.Module):
    def __init__(self, logits, features) -> None:
        super().__init__()
        self.out = (logits, features)

    def forward(self, x):
        return self.out


@pytest.mark.parametrize("name", sorted(REVIEW_REF["pairs"]))
def test_reviewkd_losses_and_feature_gradients_equal_mdistillers(name) -> None:
    pair = REVIEW_REF["pairs"][name]
    student, teacher = _tiny_pair(pair)
    x, y = _t(pair["x"]), _t(pair["y"], torch.long)
    with torch.no_grad():
        logits, features = student(x)
    logits = logits.clone().requires_grad_(True)
    leaves = {"feats": [f.clone().requires_grad_(True) for f in features["feats"]],
              "preact_feats": features["preact_feats"],
              "pooled_feat": features["pooled_feat"].clone().requires_grad_(True)}
    d = _review(_Fixed(logits, leaves), teacher)
    _load_abfs(d, pair)
    assert [a.conv1[0].in_channels for a in d.abfs] == pair["in_channels"]
    assert [a.conv2[0].out_channels for a in d.abfs] == pair["out_channels"]
    d.train()
    for epoch, want in pair["features"]["losses"].items():
        d.on_epoch_start(int(epoch), 240)
        _, losses = d(x, y)
        assert losses["hcl"].shape == (len(y),)
        assert losses["ce"].mean().item() == pytest.approx(want["loss_ce"], rel=1e-5)
        assert losses["hcl"].mean().item() == pytest.approx(want["loss_kd"], rel=1e-5), epoch
    sum(v.mean() for v in losses.values()).backward()
    for got, want in zip(leaves["feats"][1:], pair["features"]["grad_feats"]):
        _close(got.grad, want, abs_=1e-5)
    _close(leaves["pooled_feat"].grad, pair["features"]["grad_pooled_feat"], abs_=1e-5)
    _close(logits.grad, pair["features"]["grad_logits"], abs_=1e-5)


@pytest.mark.parametrize("name", sorted(REVIEW_REF["pairs"]))
def test_reviewkd_training_step_equals_mdistillers(name) -> None:
    pair = REVIEW_REF["pairs"][name]
    ref = pair["step"]
    student, teacher = _tiny_pair(pair)
    d = _review(student, teacher)
    _load_abfs(d, pair)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    d.train()
    d.on_epoch_start(ref["epoch"], 240)
    optimizer = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=ref["lr"],
                                momentum=ref["momentum"], weight_decay=ref["weight_decay"])
    _, losses = d(_t(pair["x"]), _t(pair["y"], torch.long))
    assert losses["hcl"].mean().item() == pytest.approx(ref["losses"]["loss_kd"], rel=1e-5)
    optimizer.zero_grad()
    sum(v.mean() for v in losses.values()).backward()
    optimizer.step()
    n = len(d.abfs)
    changes = {f"student.{k}": v for k, v in ref["student_change"].items()}
    for key, v in ref["abfs_change"].items():
        _, j, rest = key.split(".", 2)
        changes[f"abfs.{n - 1 - int(j)}.{rest}"] = v
    after = d.state_dict()
    assert set(changes) == {k for k in after if not k.startswith("teacher.") and after[k].is_floating_point()}
    for key, want in changes.items():
        got = digest(after[key] - before[key])
        # abs: 1e-4 of the change's size, and float noise where it is nil (the BN statistics of
        # the pooled level's 1x1 maps, whose batch mean is zero up to rounding)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4 * want[1] + 1e-6), key


def test_hcl_is_the_mean_of_its_per_sample_values() -> None:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(5, c, h, h, generator=g) for c, h in ((3, 8), (4, 2), (4, 1))]
    t = [torch.randn_like(f) for f in s]
    per_sample = hcl_loss(s, t)
    assert per_sample.shape == (5,)
    one = [hcl_loss([a[i:i + 1] for a in s], [b[i:i + 1] for b in t]) for i in range(5)]
    torch.testing.assert_close(per_sample, torch.cat(one))


def test_reviewkd_builds_the_releases_modules_from_the_shapes() -> None:
    # dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py build_review_kd: in/out channels per pair
    expected = {("resnet32x4", "resnet8x4"): ([64, 128, 256, 256], [64, 128, 256, 256], 256),
                ("resnet32x4", "ShuffleV1"): ([240, 480, 960, 960], [64, 128, 256, 256], 512),
                ("vgg13", "MobileNetV2"): ([12, 16, 48, 160, 1280], [128, 256, 512, 512, 512], 512)}
    for (t, s), (in_channels, out_channels, mid) in expected.items():
        with torch.device("meta"):  # shapes without weights
            teacher, student = build_model(t, num_classes=100), build_model(s, num_classes=100)
        d = build_distiller("reviewkd", student, teacher)
        assert [a.conv1[0].in_channels for a in d.abfs] == in_channels, (t, s)
        assert [a.conv2[0].out_channels for a in d.abfs] == out_channels, (t, s)
        assert {a.conv1[0].out_channels for a in d.abfs} == {mid}
        assert [a.att_conv is None for a in d.abfs] == [False] * (len(in_channels) - 1) + [True]


def test_reviewkd_refuses_pairs_with_different_stage_counts_in_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"dataset": "digits", "teacher": "vgg13", "student": "resnet8", "method": "reviewkd"})
    assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0]
    assert "'vgg13' has 5 stages and student 'resnet8' has 4" in e.value.problems[0]
    with torch.device("meta"):
        teacher, student = build_model("vgg13", num_classes=10), build_model("resnet8", num_classes=10)
    with pytest.raises(ValueError, match="same number of stages"):
        build_distiller("reviewkd", student, teacher)


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("method, bad", [("crd", {"nce_momentum": 1.0}), ("crd", {"nce_k": 0}),
                                         ("crd", {"nce_temperature": -0.1}), ("reviewkd", {"warmup": -1}),
                                         ("reviewkd", {"feat_weight": "high"})])
def test_bad_hyperparameters_are_refused_naming_the_key(method, bad) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"dataset": "digits", "teacher": "resnet8", "student": "resnet8", "method": method, **bad})
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"config: {key}: ")
    with pytest.raises((ValueError, TypeError), match=key):
        build_distiller(method, TinyNet(6, 12, 4), TinyNet(6, 10, 4), input_shape=(6,), **bad)


# Digits-sized settings: 64 negatives of ~1,000 other-class images; ReviewKD's loss from epoch 1.
DIGITS = {"crd": {"nce_k": 64}, "reviewkd": {"warmup": 1}}


def _engine(digits, teacher, method: str):
    cfg = RunConfig.from_dict(dict(dataset="digits", val_size=200, student="resnet8", teacher="resnet8",
                                   method=method, epochs=3, batch_size=128, device="cpu", seed=0, **DIGITS[method]))
    return build_engine(cfg, digits, teacher)


@pytest.fixture(scope="module")
def straight(digits, trained_resnet8, tmp_path_factory):
    """Three epochs of each method in one go (shared by the learning and the resume tests), with
    the engine's state saved after epoch 2: the resume test loads it into a fresh engine."""
    out, folder = {}, tmp_path_factory.mktemp("straight")
    for method in DIGITS:
        engine = _engine(digits, trained_resnet8, method)
        run = engine.run()
        metrics = [next(run), next(run)]
        # the state after epoch 2 is what a run stopped there saves (state_dict changes nothing)
        torch.save(engine.state_dict(), folder / f"{method}.pth")
        out[method] = metrics + list(run)
    return out, folder


@pytest.mark.parametrize("method", sorted(DIGITS))
def test_each_method_learns_on_digits(straight, method) -> None:
    metrics = straight[0][method]
    assert_learns(metrics, loss="train/loss_ce", label=method)
    term = {"crd": "train/loss_crd", "reviewkd": "train/loss_hcl"}[method]
    for m in metrics:
        assert math.isclose(m["train/loss"], m["train/loss_ce"] + m[term], rel_tol=1e-5)
        assert m[term] != 0


@pytest.mark.parametrize("method", sorted(DIGITS))
def test_each_method_resumes_exactly(straight, digits, trained_resnet8, method) -> None:
    metrics, folder = straight
    second = _engine(digits, trained_resnet8, method)
    second.load_state_dict(torch.load(folder / f"{method}.pth", weights_only=True))
    # CRD: memory, Z and the negatives' generator state come back with it
    keys = ("epoch", "train/loss", "val/acc1")
    assert [[m[k] for k in keys] for m in second.run()] == [[m[k] for k in keys] for m in metrics[method][2:]]
