from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdtune.config import ConfigError, RunConfig
from kdtune.data import Split
from kdtune.distillers import METHODS, build_distiller
from kdtune.distillers.connectors import ConvReg, feature_shapes
from kdtune.distillers.feature import FEATURE_LOSSES, FeatureDistiller, spot_features
from kdtune.models import build_model
from kdtune.run import build_engine
from learning import assert_learns

FEATURE_METHODS = ["at", "fitnet", "nst", "vid", "sp", "pkt", "rkd", "cc"]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _maps(b: int = 5, s: tuple = (8, 8, 8), t: tuple = (16, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(b, *s, seed=1).relu(), _randn(b, *t, seed=2).relu()


def _loss(name: str, f_s: torch.Tensor, f_t: torch.Tensor, **options):
    return FEATURE_LOSSES.build(name, [f_s.shape[1:]], [f_t.shape[1:]], **options)


# --- the registry and class attributes -----------------------------------------------------


def test_every_loss_declares_its_spot_and_kind() -> None:
    # the weights are compared with mdistiller's and SA's configs in test_reference.py
    assert FEATURE_LOSSES.names() == sorted(FEATURE_METHODS)
    for name in FEATURE_METHODS:
        cls = FEATURE_LOSSES.get(name)
        assert cls.spot in ("stages", "hint", "last", "pooled")
        assert cls.per_sample == (name in ("at", "fitnet", "nst", "vid"))
        assert METHODS.hparams(name)["feat_weight"].default == cls.weight


# --- ConvReg and the shape probe -----------------------------------------------------------


@pytest.mark.parametrize("s, t, kind", [
    ((16, 32, 32), (32, 16, 16), nn.Conv2d),           # stride-2 conv
    ((8, 8, 8), (24, 16, 16), nn.ConvTranspose2d),     # transposed conv
    ((8, 10, 10), (4, 8, 8), nn.Conv2d),               # 3x3 kernel, no padding
    ((8, 4, 4), (4, 4, 4), nn.Conv2d),                 # 1x1
    ((8, 1, 1), (4, 1, 1), nn.Conv2d),
    ((8, 2, 2), (4, 1, 1), nn.Conv2d),
    ((8, 1, 1), (4, 2, 2), nn.ConvTranspose2d),
    ((8, 3, 3), (4, 8, 8), nn.Conv2d),                 # fallback: resize + 1x1
    ((8, 1, 1), (4, 3, 3), nn.Conv2d),                 # fallback
    ((8, 6, 2), (4, 4, 4), nn.Conv2d),                 # fallback: one side larger, one smaller
])
def test_convreg_maps_any_student_shape_onto_the_teacher(s, t, kind) -> None:
    reg = ConvReg(s, t)
    assert type(reg.conv) is kind
    assert reg(torch.rand(2, *s)).shape == (2, *t)
    assert ConvReg((2, *s), (2, *t))(torch.rand(2, *s)).shape == (2, *t)  # mdistiller's 4-D shapes
    assert (ConvReg(s, t, use_relu=False)(torch.randn(3, *s)) < 0).any()


def test_convreg_classic_cases_use_the_reference_kernels() -> None:
    assert ConvReg((8, 10, 10), (4, 8, 8)).conv.kernel_size == (3, 3)
    down = ConvReg((16, 32, 32), (32, 16, 16)).conv
    assert (down.kernel_size, down.stride, down.padding) == ((3, 3), (2, 2), (1, 1))
    up = ConvReg((8, 8, 8), (24, 16, 16)).conv
    assert (up.kernel_size, up.stride, up.padding) == ((4, 4), (2, 2), (1, 1))
    assert ConvReg((8, 3, 3), (4, 8, 8)).resize == (8, 8)


def test_feature_shapes_probe_changes_neither_mode_nor_statistics() -> None:
    model = build_model("resnet8", num_classes=10, in_channels=1)
    model.train()
    model.layer1.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = feature_shapes(model, (1, 8, 8))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())
    _, feats = model.eval()(torch.zeros(3, 1, 8, 8))
    assert shapes["feats"] == [f.shape[1:] for f in feats["feats"]]
    assert shapes["preact_feats"] == [f.shape[1:] for f in feats["preact_feats"]]
    assert shapes["pooled_feat"] == feats["pooled_feat"].shape[1:]
    assert all(isinstance(s, torch.Size) for s in shapes["feats"])


def test_spot_features_pick_the_documented_entries() -> None:
    features = {"feats": ["stem", "s1", "s2", "s3"], "preact_feats": [], "pooled_feat": "pooled"}
    assert spot_features(features, "stages") == ["s1", "s2", "s3"]
    assert spot_features(features, "hint") == ["s2"]
    assert spot_features(features, "hint", hint_layer=0) == ["stem"]
    assert spot_features(features, "last") == ["s3"]
    assert spot_features(features, "pooled") == ["pooled"]
    with pytest.raises(IndexError, match="hint_layer 4 out of range"):
        spot_features(features, "hint", hint_layer=4)
    with pytest.raises(ValueError, match="unknown spot"):
        spot_features(features, "everywhere")


# --- losses against hand computations and direct re-computations of the references ----------


def test_at_by_hand() -> None:
    # one channel, maps [1, 0] and [0, 1]: unit attention maps e1 and e2, mean squared diff 1
    f_s = torch.tensor([[[[1.0, 0.0]]]])
    f_t = torch.tensor([[[[0.0, 1.0]]]])
    (loss,) = _loss("at", f_s, f_t)([f_s], [f_t])
    assert torch.allclose(loss, torch.tensor([1.0]))
    (same,) = _loss("at", f_s, f_s)([f_s], [3 * f_s])  # scale invariant
    assert torch.allclose(same, torch.zeros(1), atol=1e-7)


@pytest.mark.parametrize("s, t", [((8, 8, 8), (16, 4, 4)), ((8, 2, 2), (16, 8, 8)), ((8, 4, 4), (3, 4, 4))])
def test_at_mean_is_the_reference_loss(s, t) -> None:
    f_s, f_t = _maps(s=s, t=t)
    (loss,) = _loss("at", f_s, f_t)([f_s], [f_t])
    h = min(s[1], t[1])
    ps, pt = F.adaptive_avg_pool2d(f_s, h), F.adaptive_avg_pool2d(f_t, h)
    a_s = F.normalize(ps.pow(2).mean(1).view(5, -1))
    a_t = F.normalize(pt.pow(2).mean(1).view(5, -1))
    assert loss.shape == (5,)
    torch.testing.assert_close(loss.mean(), (a_s - a_t).pow(2).mean())
    (loss_p4,) = _loss("at", f_s, f_t, p=4.0)([f_s], [f_t])
    a_s4 = F.normalize(ps.pow(4).mean(1).view(5, -1))
    a_t4 = F.normalize(pt.pow(4).mean(1).view(5, -1))
    torch.testing.assert_close(loss_p4.mean(), (a_s4 - a_t4).pow(2).mean())


def test_at_sums_over_every_stage_pair() -> None:
    s_maps = [_randn(4, 8, 8, 8, seed=i) for i in range(3)]
    t_maps = [_randn(4, 16, 8, 8, seed=10 + i) for i in range(3)]
    loss = FEATURE_LOSSES.build("at", [m.shape[1:] for m in s_maps], [m.shape[1:] for m in t_maps])
    out = loss(s_maps, t_maps)
    assert len(out) == 3
    for i in range(3):
        (single,) = _loss("at", s_maps[i], t_maps[i])([s_maps[i]], [t_maps[i]])
        torch.testing.assert_close(out[i], single)


@pytest.mark.parametrize("s, t", [((8, 8, 8), (16, 4, 4)), ((8, 4, 4), (16, 8, 8)), ((8, 4, 4), (16, 4, 4))])
def test_fitnet_mean_is_mse_of_the_regressed_hint(s, t) -> None:
    f_s, f_t = _maps(s=s, t=t)
    loss_fn = _loss("fitnet", f_s, f_t)
    (loss,) = loss_fn([f_s], [f_t])
    assert loss.shape == (5,)
    torch.testing.assert_close(loss.mean(), F.mse_loss(loss_fn.connectors[0](f_s), f_t))


def test_nst_mean_is_the_reference_mmd() -> None:
    f_s, f_t = _maps(s=(6, 8, 8), t=(10, 4, 4))
    (loss,) = _loss("nst", f_s, f_t)([f_s], [f_t])
    s = F.normalize(F.adaptive_avg_pool2d(f_s, 4).reshape(5, 6, -1), dim=2)
    t = F.normalize(f_t.reshape(5, 10, -1), dim=2)

    def kernel(a, b):  # (a_i . b_j)^2 for every channel pair, written out with einsum
        return torch.einsum("bin,bjn->bij", a, b).pow(2)

    expected = kernel(t, t).mean() + kernel(s, s).mean() - 2 * kernel(s, t).mean()
    assert loss.shape == (5,)
    torch.testing.assert_close(loss.mean(), expected)
    (zero,) = _loss("nst", f_s, f_s)([f_s], [f_s])
    assert torch.allclose(zero, torch.zeros(5), atol=1e-6)


def test_vid_mean_is_the_gaussian_nll_and_starts_at_the_initial_variance() -> None:
    f_s, f_t = _maps(s=(6, 8, 8), t=(10, 4, 4))
    loss_fn = _loss("vid", f_s, f_t, init_pred_var=3.0)
    head = loss_fn.heads[0]
    var = torch.log(1.0 + torch.exp(head.log_scale)) + 1e-5
    torch.testing.assert_close(var, torch.full((10,), 3.0))
    (loss,) = loss_fn([f_s], [f_t])
    mean = head.regressor(F.adaptive_avg_pool2d(f_s, 4))
    v = var.view(1, -1, 1, 1)
    expected = torch.mean(0.5 * ((mean - f_t) ** 2 / v + torch.log(v)))
    assert loss.shape == (5,)
    torch.testing.assert_close(loss.mean(), expected)
    assert isinstance(head.log_scale, nn.Parameter)  # trained, as in CRD/SA


def test_sp_is_the_reference_batch_value_broadcast() -> None:
    f_s, f_t = _maps(s=(6, 4, 4), t=(10, 2, 2))
    (loss,) = _loss("sp", f_s, f_t)([f_s], [f_t])
    b = 5
    g_s, g_t = f_s.view(b, -1) @ f_s.view(b, -1).t(), f_t.view(b, -1) @ f_t.view(b, -1).t()
    g_s = g_s / g_s.norm(dim=1, keepdim=True)
    g_t = g_t / g_t.norm(dim=1, keepdim=True)
    expected = ((g_t - g_s) ** 2).sum() / b**2
    assert loss.shape == (5,) and torch.all(loss == loss[0])
    torch.testing.assert_close(loss.mean(), expected)
    (scaled,) = _loss("sp", f_s, f_s)([f_s], [2 * f_s])  # invariant to the features' scale
    assert torch.allclose(scaled, torch.zeros(5), atol=1e-6)


def test_pkt_is_the_reference_batch_value_broadcast() -> None:
    f_s, f_t = _randn(6, 7, seed=3), _randn(6, 9, seed=4)
    (loss,) = _loss("pkt", f_s, f_t)([f_s], [f_t])
    eps = 1e-7

    def probabilities(x):
        cos = F.cosine_similarity(x[:, None, :], x[None, :, :], dim=2, eps=0.0)
        sim = (cos + 1) / 2
        return sim / sim.sum(1, keepdim=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    expected = torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))
    assert loss.shape == (6,) and torch.all(loss == loss[0])
    torch.testing.assert_close(loss.mean(), expected, rtol=1e-4, atol=1e-7)
    (zero,) = _loss("pkt", f_s, f_s)([f_s], [f_s])
    assert torch.allclose(zero, torch.zeros(6), atol=1e-6)


def test_rkd_is_the_reference_batch_value_broadcast() -> None:
    b = 5
    f_s, f_t = _randn(b, 7, seed=5), _randn(b, 9, seed=6)
    (loss,) = _loss("rkd", f_s, f_t)([f_s], [f_t])

    def distances(e):
        d = torch.cdist(e, e)
        return d / d[~torch.eye(b, dtype=torch.bool)].mean()

    def angles(e):
        out = torch.zeros(b, b, b)
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u, v = e[j] - e[i], e[k] - e[i]
                    if u.norm() > 0 and v.norm() > 0:
                        out[i, j, k] = torch.dot(u, v) / (u.norm() * v.norm())
        return out

    expected = (25 * F.smooth_l1_loss(distances(f_s), distances(f_t))
                + 50 * F.smooth_l1_loss(angles(f_s), angles(f_t)))
    assert loss.shape == (b,) and torch.all(loss == loss[0])
    torch.testing.assert_close(loss.mean(), expected, rtol=1e-4, atol=1e-6)
    (weighted,) = _loss("rkd", f_s, f_t, distance_weight=1.0, angle_weight=0.0)([f_s], [f_t])
    torch.testing.assert_close(weighted.mean(), F.smooth_l1_loss(distances(f_s), distances(f_t)),
                               rtol=1e-4, atol=1e-6)
    (zero,) = _loss("rkd", f_s, 3 * f_s)([f_s], [3 * f_s])  # invariant to scale
    assert torch.allclose(zero, torch.zeros(b), atol=1e-6)


def test_cc_is_the_reference_batch_value_broadcast() -> None:
    f_s, f_t = _randn(6, 7, seed=7), _randn(6, 9, seed=8)
    loss_fn = _loss("cc", f_s, f_t, feat_dim=4)
    (loss,) = loss_fn([f_s], [f_t])
    delta = (loss_fn.embed_s[0](f_s) - loss_fn.embed_t[0](f_t)).abs()
    expected = sum((delta[i] * delta[i + 1]).sum() for i in range(5)) / 5
    assert loss.shape == (6,) and torch.all(loss == loss[0])
    torch.testing.assert_close(loss.mean(), expected)


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "cc"])
def test_relational_losses_give_zero_for_a_single_sample(name) -> None:
    f = _randn(1, 4, 2, 2) if name == "sp" else _randn(1, 6)
    (loss,) = _loss(name, f, f)([f], [f])
    assert loss.shape == (1,) and loss.item() == 0.0


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_losses_compute_in_float32_under_bf16_autocast(name) -> None:
    if FEATURE_LOSSES.get(name).spot == "pooled":
        f_s, f_t = _randn(4, 6, seed=1), _randn(4, 8, seed=2)
    else:
        f_s, f_t = _maps(b=4, s=(6, 4, 4), t=(8, 4, 4))
    loss_fn = _loss(name, f_s, f_t)
    (full,) = loss_fn([f_s], [f_t])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (half,) = loss_fn([f_s.bfloat16()], [f_t.bfloat16()])
    assert half.dtype == torch.float32 and full.dtype == torch.float32
    assert torch.allclose(half, full, rtol=0.05, atol=1e-3 * full.abs().max().item() + 1e-6)


# --- heterogeneous pairs and tiny inputs ---------------------------------------------------


PAIRS = [("resnet32x4", "ShuffleV1", (3, 32, 32)), ("vgg13", "MobileNetV2", (3, 32, 32)),
         ("resnet20", "resnet8", (1, 8, 8))]


@pytest.fixture(scope="module")
def pairs():
    torch.manual_seed(0)
    out = {}
    for t, s, shape in PAIRS:
        out[(t, s)] = (build_model(t, num_classes=10, in_channels=shape[0]).eval(),
                       build_model(s, num_classes=10, in_channels=shape[0]), shape)
    return out


@pytest.mark.parametrize("name", FEATURE_METHODS)
@pytest.mark.parametrize("pair", [p[:2] for p in PAIRS], ids=lambda p: "->".join(p))
def test_heterogeneous_pairs_build_and_give_one_loss_per_sample(pairs, pair, name) -> None:
    teacher, student, shape = pairs[pair]
    distiller = build_distiller(name, student, teacher, input_shape=shape)
    assert isinstance(distiller, FeatureDistiller)
    x, y = torch.randn(3, *shape), torch.randint(0, 10, (3,))
    logits, losses = distiller(x, y)
    assert logits.shape == (3, 10)
    assert set(losses) == {"ce", "feat"}
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in losses.values())
    loss = distiller.feat_loss
    s_spots = loss.select(student(x)[1])
    assert len(s_spots) == loss.num_spots
    if loss.spot == "stages":
        n_s, n_t = (len(feature_shapes(m, shape)["feats"]) for m in (student, teacher))
        assert loss.num_spots == min(n_s, n_t) - 1


def test_fitnet_hint_layer_is_checked_against_the_models(pairs) -> None:
    teacher, student, shape = pairs[("resnet20", "resnet8")]
    with pytest.raises(IndexError, match="hint_layer 9"):
        build_distiller("fitnet", student, teacher, input_shape=shape, hint_layer=9)
    d = build_distiller("fitnet", student, teacher, input_shape=shape, hint_layer=3)
    assert d.feat_loss.connectors[0](torch.rand(2, 64, 2, 2)).shape == (2, 64, 2, 2)


@pytest.mark.parametrize("name", ["fitnet", "vid", "cc", "at"])
def test_gradients_reach_student_and_connectors_not_teacher(pairs, name) -> None:
    teacher, student, shape = pairs[("resnet32x4", "ShuffleV1")]
    distiller = build_distiller(name, student, teacher, input_shape=shape)
    distiller.train()
    assert not teacher.training
    _, losses = distiller(torch.randn(4, *shape), torch.randint(0, 10, (4,)))
    student.zero_grad(set_to_none=True)
    losses["feat"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    extra = list(distiller.feat_loss.parameters())
    if name == "at":
        assert extra == []
    else:
        assert extra and all(p.grad is not None for p in extra)
    grouped = {id(p) for g in distiller.param_groups() for p in g["params"]}
    assert {id(p) for p in extra} <= grouped
    assert not grouped & {id(p) for p in teacher.parameters()}
    assert all(k.startswith(("student.", "feat_loss.")) for k in distiller.trainable_state_dict())


# --- configuration and training runs -------------------------------------------------------


def test_flat_keys_route_to_the_feature_methods() -> None:
    cfg = RunConfig.from_dict({"method": "at", "feat_weight": 500, "p": 2, "ce_weight": 1})
    assert cfg.method_params == {"feat_weight": 500.0, "p": 2.0, "ce_weight": 1.0}
    assert RunConfig.from_dict({"method": "fitnet", "hint_layer": 1}).method_params == {"hint_layer": 1}
    assert RunConfig.from_dict({"method": "rkd", "angle_weight": 0}).method_params == {"angle_weight": 0.0}
    for name in FEATURE_METHODS:
        params = METHODS.hparams(name)
        assert {"ce_weight", "feat_weight"} <= set(params) and "input_shape" not in params
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "fitnet", "feat_weight": -1, "hint_layer": -1, "temperature": 4})
    text = "\n".join(e.value.problems)
    assert "feat_weight: must be >= 0, but got -1.0" in text
    assert "hint_layer: must be >= 0, but got -1" in text
    assert "temperature: unknown key" in text
    with pytest.raises(ConfigError, match="p: must be > 0"):
        RunConfig.from_dict({"method": "at", "p": 0})


def test_build_distiller_passes_the_input_shape_only_to_builders_that_take_it() -> None:
    teacher = build_model("resnet8", num_classes=10, in_channels=1)
    student = build_model("resnet8", num_classes=10, in_channels=1)
    kd = build_distiller("kd", student, teacher, input_shape=(1, 8, 8), temperature=2.0)
    assert kd.temperature == 2.0
    fit = build_distiller("fitnet", student, teacher, input_shape=(1, 8, 8))
    assert fit.feat_loss.connectors[0](torch.rand(2, 32, 4, 4)).shape == (2, 32, 4, 4)


@pytest.fixture(scope="module")
def digits_teacher():
    torch.manual_seed(123)
    return build_model("resnet8", num_classes=10, in_channels=1)


def _cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", student="resnet8", teacher="resnet8", epochs=2, batch_size=256,
                val_size=200, device="cpu", seed=0)
    base.update(kw)
    return RunConfig.from_dict(base)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_each_method_learns_on_digits(digits, trained_resnet8, name) -> None:
    # A trained teacher (matching a random network's features teaches little), 20 steps an epoch,
    # and for AT a digits-sized weight: its CIFAR weight of 1000 swamps the CE on 8x8 maps (CE
    # climbs from 2.7 to 17 in 3 epochs), as sakd_quickstart.yaml notes for SAKD's AT.
    weight = {"feat_weight": 100.0} if name == "at" else {}
    engine = build_engine(_cfg(method=name, epochs=3, batch_size=64, **weight), digits, trained_resnet8)
    metrics = list(engine.run())
    assert len(metrics) == 3
    assert_learns(metrics, loss="train/loss_ce", label=name)
    for m in metrics:
        assert math.isclose(m["train/loss"], m["train/loss_ce"] + m["train/loss_feat"], rel_tol=1e-5)
        assert m["train/loss_feat"] != 0, (name, m)  # the feature term is live


def test_bf16_autocast_run_follows_the_float32_run(digits, digits_teacher) -> None:
    # bfloat16 convolutions are emulated on CPUs without bf16 units (5 s an epoch of digits): 320
    # training images in batches of 64 make as many steps (5) as an epoch of digits in batches of 256
    data = dataclasses.replace(digits, train=Split(digits.train.images[:320], digits.train.labels[:320]))
    torch.manual_seed(0)
    m16 = next(build_engine(_cfg(method="fitnet", amp=True, epochs=1, batch_size=64), data, digits_teacher).run())
    torch.manual_seed(0)
    m32 = next(build_engine(_cfg(method="fitnet", epochs=1, batch_size=64), data, digits_teacher).run())
    assert m16["samples/epoch"] == m32["samples/epoch"] == 320
    assert m16["train/loss"] != m32["train/loss"]  # autocast did run in bfloat16
    # same seed, same batches: bfloat16's ~3 significant digits move the losses by a few percent
    for key in ("train/loss", "train/loss_feat", "train/loss_ce"):
        assert m16[key] == pytest.approx(m32[key], rel=0.05), (key, m16[key], m32[key])
