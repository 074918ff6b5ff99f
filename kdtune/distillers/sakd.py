"""SAKD: spot-adaptive distillation (Song et al., TIP 2022) over a feature distiller.

A policy network decides, per sample and per iteration, at which *spots* to distil: the
feature distiller's layers plus the output logits. The policy learns from a *routing*
forward in which teacher and student streams are mixed at every spot by its gates; a spot is
switched on for a sample when routing that sample through the teacher there lowers the
mixed network's classification loss.

One optimizer, two parameter groups, the same updates as the reference's two optimizers:
the student's losses never reach the policy (its gates are detached where they mask the
losses), and the routing loss never reaches the student (its parameters are frozen while
the routing forward is recorded). The policy and the routing adapters get their own
learning-rate scale and weight decay (reference: half the base LR, weight decay 1e-3, the
same schedule).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.connectors import ConvReg, feature_shapes, num_stages
from kdtune.distillers.feature import FEATURE_LOSSES, spot_indices
from kdtune.distillers.functional import kd_loss
from kdtune.hparams import Problem, Schema, hp

GATES = ("policy", "anti", "random")
RANDOM_LOGIT_GATES = ("shared", "own")


def homogeneous(teacher_shapes: dict, student_shapes: dict, teacher: nn.Module, student: nn.Module) -> bool:
    """The released configs' ``homo`` flag as a rule: the same architecture family (model class)
    *and* the same width at every stage (channels of each ``feats`` entry, from
    :func:`~kdtune.distillers.connectors.feature_shapes`). resnet110 -> resnet32 is homogeneous;
    resnet32x4 -> resnet32 (32-256 vs 16-64 channels) is not, as in the release."""
    widths = [[tuple(f)[-3] for f in shapes["feats"]] for shapes in (teacher_shapes, student_shapes)]
    return type(teacher) is type(student) and widths[0] == widths[1]


def straight_through_gates(logits: Tensor, temperature: float) -> Tensor:
    """Hard 0/1 "distil" gates [B, K] from policy logits [B, K, 2]: a Gumbel-softmax sample,
    one-hot in the forward pass with the soft sample's gradient in the backward pass.

    ``F.gumbel_softmax`` runs on any device (the reference's sampler is CUDA-only); index 0
    of each pair is "distil", as in the reference.
    """
    return F.gumbel_softmax(logits.float(), tau=temperature, hard=True, dim=-1)[..., 0]


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with its parameters not requiring grad: autograd records no
    edge to them, so a loss computed inside cannot update them, while gradients still flow
    through the model to its inputs."""
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


def _mix_shape(gate: Tensor, like: Tensor) -> Tensor:
    return gate.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@METHODS.register("sakd")
class SAKD(Distiller):
    """Spot-adaptive KD over ``feature_loss`` (``at``, ``fitnet``, ...) plus the logit spot.

    Student loss: ``ce_weight * CE + feat_weight * sum_k mean_b(g_bk * L_k,b) + kd_weight *
    mean_b(g_b,out * T^2 KL_b)``: each spot's per-sample loss counts only for the samples
    gated on, which is the reference's loss on the selected subset times |selected| / B.

    Routing loss (policy and adapters only): CE of the mixed logits, multiplied by
    ``route_gamma`` when it exceeds the student's own CE and divided by it otherwise, plus
    ``hinge_weight * max(0, B/2 - sum_b g_b,out)`` (the reference's push to route at least
    half of the batch through the teacher's logits; hinge weight 1 there).

    Defaults: the reference's. ``feat_weight`` and ``route_gamma`` default to the values the
    reference uses for the chosen feature loss (AT: 1000 and 2); ``gate_bias`` (added to
    every "distil" logit of the policy at init) to +10 for a homogeneous pair, 0 otherwise.
    Homogeneous follows the released configs' ``homo`` flags: same architecture family *and*
    same stage widths (:func:`homogeneous`; resnet32x4 -> resnet32 starts at 0). ``gates``:
    ``policy`` (SAKD), ``anti`` (distil where the policy says *not* to, the paper's anti-SAKD
    ablation, same policy training) or ``random`` (per-sample Bernoulli(0.5) gates, no
    policy: the released ``train_random.py``).

    Under ``gates: random``:
      * ``random_logit_gate``: ``shared`` (default, the release) reuses the last feature
        spot's gate as the logit spot's gate for the every-stage losses (AT, NST, VID: the
        release draws one gate per stage and none for the logits); ``own`` draws the logit
        gate on its own (kdtune before; FitNet always has its own, as in the release).
      * ``random_ce_gamma``: false (default) keeps the student's CE at ``ce_weight``; true
        multiplies it by ``route_gamma`` as the release does (``train_random.py`` applies
        ``classify_weight``, 2 for AT, RKD and VID, to the CE). Taken as a bug there:
        ``classify_weight`` is the routing loss's γ in the SAKD trainer (``train.py``),
        whose student CE has weight 1, as in ``train_reverse.py`` and
        ``train_baseline.py``; random gates have no routing loss, and the doubled CE for
        just those three losses confounds the ablation against SAKD.
    """

    unweighted_terms = ("ce", "route")  # the routing loss is batch-level: KDAS must not reweight it
    hparams = Schema(
        feature_loss=hp("at", help="the feature loss gated per spot (a per-sample, spatial one: at, fitnet, nst, vid)"),
        feat_weight=hp(None, type=float, gt=0, null_means="the reference's value for the feature loss",
                       help="weight of the gated feature loss"),
        ce_weight=CE_WEIGHT,
        kd_weight=hp(1.0, ge=0, help="weight of the gated logit (KD) spot"),
        temperature=hp(4.0, gt=0, help="softmax temperature of the logit spot"),
        gates=hp("policy", choices=GATES, help="policy (SAKD), anti (the paper's ablation) or random"),
        gumbel_temperature=hp(5.0, gt=0, help="temperature of the policy's Gumbel-softmax"),
        gate_bias=hp(None, type=float, null_means="+10 for a homogeneous pair, else 0",
                     help="added to every 'distil' logit of the policy at init"),
        route_gamma=hp(None, type=float, gt=0, null_means="the reference's value for the feature loss",
                       help="sharpens (or softens) the routing loss against the student's CE"),
        hinge_weight=hp(1.0, ge=0, help="push to route at least half the batch through the teacher's logits"),
        policy_lr_scale=hp(0.5, ge=0, help="learning rate of the policy and adapters relative to the student's"),
        policy_weight_decay=hp(1e-3, ge=0, help="weight decay of the policy and adapters"),
        hint_layer=hp(2, ge=0, help="the FitNet spot's feature map (feature_loss fitnet)"),
        random_logit_gate=hp("shared", choices=RANDOM_LOGIT_GATES,
                             help="random gates: the logit spot shares the last stage's gate (the release's) or draws its own"),
        random_ce_gamma=hp(False, help="random gates: CE times route_gamma, the release's bug (off: CE weight as given)"),
    )

    def __init__(self, student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32),
                 **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        loss_cls = FEATURE_LOSSES.get(self.feature_loss)
        for name, model in (("student", student), ("teacher", teacher)):
            if not hasattr(model, "forward_stage"):
                raise ValueError(f"SAKD runs models stage by stage; the {name} "
                                 f"{type(model).__name__} has no forward_stage")
        if teacher.num_stages != student.num_stages:
            raise ValueError(f"SAKD mixes teacher and student stage by stage, but the teacher has "
                             f"{teacher.num_stages} stages and the student {student.num_stages}")
        # Stage i outputs feats[i], so a spot's feature indices are the stages to mix after.
        self.spots = spot_indices(loss_cls.spot, student.num_stages, self.hint_layer)
        s_shapes, t_shapes = feature_shapes(student, input_shape), feature_shapes(teacher, input_shape)
        s_spot = [s_shapes["feats"][i] for i in self.spots]
        t_spot = [t_shapes["feats"][i] for i in self.spots]
        self.feature = loss_cls(s_spot, t_spot)
        if self.feat_weight is None:
            self.feat_weight = loss_cls.sakd_weight
        if self.route_gamma is None:
            self.route_gamma = loss_cls.sakd_gamma
        if self.gates == "random" and self.random_ce_gamma:
            self.ce_weight = self.ce_weight * self.route_gamma
        # The release's random gates share the logit gate only where it draws one gate per stage.
        self.share_logit_gate = (self.gates == "random" and self.random_logit_gate == "shared"
                                 and loss_cls.spot == "stages")
        self.spot_names = [f"stage{i}" for i in self.spots] + ["logits"]
        k = len(self.spot_names)

        # Everything the routing loss trains: the policy and, per spot, the two adapters.
        self.router = nn.Module()
        pooled = t_shapes["pooled_feat"][0] + s_shapes["pooled_feat"][0]
        self.router.policy = nn.Linear(pooled, 2 * k)
        homo = homogeneous(t_shapes, s_shapes, teacher, student)
        bias = (10.0 if homo else 0.0) if self.gate_bias is None else self.gate_bias
        with torch.no_grad():
            self.router.policy.bias.view(k, 2)[:, 0] += bias
        self.router.to_teacher = nn.ModuleList(ConvReg(s, t) for s, t in zip(s_spot, t_spot))
        self.router.to_student = nn.ModuleList(ConvReg(t, s) for s, t in zip(s_spot, t_spot))
        self._gate_sum: Tensor | None = None
        self._gate_count = 0

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits, s_feat = self.student(x)
        with torch.no_grad():
            t_logits, t_feat = self.teacher(x)
        soft_gates = self._sample_gates(s_feat["pooled_feat"], t_feat["pooled_feat"], x.shape[0])
        hard = soft_gates.detach()
        self._accumulate(hard)
        mask = 1.0 - hard if self.gates == "anti" else hard

        s_spots = [s_feat["feats"][i] for i in self.spots]
        t_spots = [t_feat["feats"][i] for i in self.spots]
        spot_losses = self.feature(s_spots, t_spots)
        feat = sum(mask[:, k] * loss for k, loss in enumerate(spot_losses))
        kd = mask[:, -1] * kd_loss(logits, t_logits, self.temperature)
        ce = self.ce(logits, y)
        losses = {"ce": self.ce_weight * ce, "feat": self.feat_weight * feat, "kd": self.kd_weight * kd}
        if self.gates != "random":
            route = self._routing_loss(x, y, soft_gates, ce.detach().mean(), t_feat["feats"])
            losses["route"] = route.expand(x.shape[0])
        return logits, losses

    def _sample_gates(self, s_pooled: Tensor, t_pooled: Tensor, batch: int) -> Tensor:
        k = len(self.spot_names)
        if self.gates == "random":
            gates = (torch.rand(batch, k, device=s_pooled.device) < 0.5).float()
            return torch.cat([gates[:, :-1], gates[:, -2:-1]], 1) if self.share_logit_gate else gates
        policy_in = torch.cat([t_pooled, s_pooled], dim=1).detach().float()
        # The gate policy stays fp32 under bf16 autocast: its logits pick each sample's route.
        with torch.autocast(policy_in.device.type, enabled=False):
            return straight_through_gates(self.router.policy(policy_in).view(batch, k, 2), self.gumbel_temperature)

    def _routing_loss(self, x: Tensor, y: Tensor, gates: Tensor, student_ce: Tensor,
                      teacher_feats: list[Tensor]) -> Tensor:
        """The mixed network's reshaped classification loss (trains the router only).

        Up to the first spot the teacher stream is the teacher's own forward pass (frozen, in
        eval mode, nothing mixed in yet), so it starts from the features already computed.
        """
        first = self.spots[0]
        s, t = x, teacher_feats[first]
        with frozen(self.student):
            k = 0
            for i in range(self.student.num_stages):
                s = self.student.forward_stage(i, s)[0]
                if i > first:
                    t = self.teacher.forward_stage(i, t)[0]
                if k < len(self.spots) and i == self.spots[k]:
                    g = _mix_shape(gates[:, k], t)
                    s, t = (g * self.router.to_student[k](t) + (1 - g) * s,
                            g * t + (1 - g) * self.router.to_teacher[k](s))
                    k += 1
            s_logits, t_logits = self.student.forward_head(s)[0], self.teacher.forward_head(t)[0]
        g_out = gates[:, -1:]
        mixed = g_out * t_logits.float() + (1 - g_out) * s_logits.float()
        route = F.cross_entropy(mixed, y)
        # Sharper when routing does worse than the student alone, gentler when it does better.
        route = torch.where(route > student_ce, route * self.route_gamma, route / self.route_gamma)
        return route + self.hinge_weight * F.relu(x.shape[0] / 2 - gates[:, -1].sum())

    # ------------------------------------------------------------------ bookkeeping

    def _accumulate(self, hard: Tensor) -> None:
        total = hard.sum(0)
        self._gate_sum = total if self._gate_sum is None else self._gate_sum + total
        self._gate_count += hard.shape[0]

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        self._gate_sum, self._gate_count = None, 0

    def epoch_metrics(self) -> dict[str, float]:
        """Per spot, the share of the epoch's samples the gates switched on."""
        if self._gate_sum is None:
            return {}
        rates = (self._gate_sum / self._gate_count).tolist()  # one host read per epoch
        return {f"sakd/gate_{name}": rate for name, rate in zip(self.spot_names, rates)}

    def param_groups(self) -> list[dict[str, Any]]:
        return self.groups_apart(self.router, lr_scale=self.policy_lr_scale,
                                 weight_decay=self.policy_weight_decay)

    @classmethod
    def check_models(cls, teacher: str, student: str, params: dict[str, Any]) -> list[str]:
        stages = {name: num_stages(name) for name in (teacher, student)}
        problems = []
        if stages[teacher] != stages[student]:
            problems.append(f"method: 'sakd' mixes teacher and student stage by stage, but teacher "
                            f"{teacher!r} has {stages[teacher]} stages and student {student!r} has "
                            f"{stages[student]}; pick a pair with the same number of stages")
        hint, name = params["hint_layer"], params["feature_loss"]
        if name in FEATURE_LOSSES and FEATURE_LOSSES.get(name).spot == "hint" and not 0 < hint < stages[student]:
            problems.append(f"hint_layer: must be in [1, {stages[student] - 1}] for student {student!r}, "
                            f"but got {hint!r}")
        return problems

    @classmethod
    def check(cls, params: dict[str, Any]) -> list[Problem]:
        name = params["feature_loss"]
        if name not in FEATURE_LOSSES:
            return [Problem("feature_loss", FEATURE_LOSSES.unknown_message(name))]
        loss_cls = FEATURE_LOSSES.get(name)
        if not loss_cls.per_sample or loss_cls.spot == "pooled":
            supported = [n for n in FEATURE_LOSSES.names()
                         if FEATURE_LOSSES.get(n).per_sample and FEATURE_LOSSES.get(n).spot != "pooled"]
            return [Problem("feature_loss", f"SAKD gates each sample's loss at layers between stages; "
                                            f"{name!r} is not per-sample or sits on the pooled embedding "
                                            f"(supported: {', '.join(supported)})")]
        return []
