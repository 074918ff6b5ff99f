"""Regenerate the golden values under tests/data/ by running the public reference code.

    python tests/tools/reference_goldens.py \\
        --mdistiller  PATH/mdistiller               (megvii-research/mdistiller) \\
        --ls          PATH/logit-standardization-KD (sunshangquan/logit-standardization-KD) \\
        --kdas        PATH/kdas_iccv                (byungchul-chae/kdas_iccv) \\
        --ctkd        PATH/CTKD                     (zhengli97/CTKD) \\
        --sa          PATH/spot-adaptive-pytorch    (zju-vipa/spot-adaptive-pytorch) \\
        [--repdistiller PATH/RepDistiller]          (HobbitLong/RepDistiller: CRD's cross-check) \\
        [--mlkd PATH/Multi-Level-Logit-Distillation] (Jin-Ying/Multi-Level-Logit-Distillation) \\
        [--dist PATH/DIST_KD]                       (hunto/DIST_KD, with --recurse-submodules) \\
        [--ttm PATH/TTM]                            (zkxufo/TTM) \\
        [--out tests/data]

Each PATH is a git checkout of that repository; its commit (``git rev-parse HEAD``) is written
into every JSON file made from it. Nothing of the reference code is copied here or into the
package: this script imports the reference modules from the given checkouts, calls them on
seeded inputs and keeps only their outputs (and the inputs, so the tests need no RNG).

Where a reference module imports something that is not installed here and that the function
used does not need, the import is stubbed (``_stub``; each one is listed in the file's
``_meta.stubbed_imports``):
  - kdas_iccv's trainer imports ``tensorboardX`` (logging only);
  - CTKD's ``train_student.py`` imports ``imgaug`` through its ImageNet loader;
  - mdistiller's ``engine/cfg.py`` builds its defaults with ``yacs``'s CfgNode, replaced by a
    minimal attribute dict when yacs is not installed (only attribute assignment is used), and
    is reached through ``mdistiller.engine``, whose trainers import ``tensorboardX``;
  - the reference trainers call ``.cuda()``; it is the identity while they run here (CPU).

Files written: reference_losses.json (KD, DKD: mdistiller; with logit standardization: LS),
reference_kdas.json (ratio schedule, scoring epochs, exclusion, selection, penalty-weighted KD:
kdas_iccv), reference_ctkd.json (curricula, global temperature and its reversed gradient: CTKD),
reference_feature_weights.json (mdistiller's standalone feature-loss weights, SA's SAKD
weights), mdistiller_cifar_shapes.json (the model manifest: state-dict key -> shape and
parameter count of every model in mdistiller's cifar_model_dict); and through the generators
beside this file (each also runs alone: ``python tests/tools/goldens_<method>.py --help``):
reference_crd.json and reference_reviewkd.json (mdistiller), reference_mlkd.json (MLKD and LS),
reference_dist.json (DIST_KD) and reference_wttm.json (TTM).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

STUBBED: list[str] = []


# ----------------------------------------------------------------------------- plumbing


def commit_of(path: Path) -> str:
    sha = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if dirty:
        raise SystemExit(f"error: {path} has local changes; goldens must come from a clean commit")
    return sha


def _stub(name: str, **attrs: Any) -> None:
    """Register an empty module ``name`` (and its parents) unless it is importable."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)
    STUBBED.append(name)


@contextlib.contextmanager
def reference(root: Path, *packages: str) -> Iterator[None]:
    """Import from ``root``: on sys.path first, with any previously imported module of the same
    top-level names dropped (mdistiller, LS and kdas_iccv all ship a package ``mdistiller``)."""
    def drop() -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in packages:
                del sys.modules[name]
    drop()
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        drop()


@contextlib.contextmanager
def cuda_is_identity() -> Iterator[None]:
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference trainers move batches with .cuda()
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def tensor_list(t: torch.Tensor) -> list:
    """A float32 tensor as nested lists of 9-significant-digit floats (exact for float32)."""
    def short(v):
        return [short(x) for x in v] if isinstance(v, list) else float(f"{v:.9g}")
    return short(t.detach().tolist()) if t.is_floating_point() else t.tolist()


def logit_cases() -> list[dict[str, Any]]:
    """Seeded student/teacher logits and labels: ordinary, large-scale and many-class."""
    cases = []
    for seed, (b, c, scale) in enumerate([(8, 10, 3.0), (6, 5, 10.0), (4, 100, 2.0)]):
        g = torch.Generator().manual_seed(seed)
        cases.append({"student": torch.randn(b, c, generator=g) * scale,
                      "teacher": torch.randn(b, c, generator=g) * scale,
                      "target": torch.randint(0, c, (b,), generator=g)})
    return cases


def dump(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1)
    # lists of numbers on one line (shapes, logits rows): diffs stay readable
    text = re.sub(r"\[\s*([-0-9.e,\s]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    path.write_text(text + "\n")
    print(f"wrote {path}")


def write_golden(path: Path, payload: dict[str, Any], generator: str, stubbed: list[str]) -> None:
    """``payload`` to ``path``, its ``_meta`` naming the script that made it and the imports its
    reference needed stubbed."""
    payload["_meta"]["generator"] = generator
    payload["_meta"]["stubbed_imports"] = stubbed
    dump(path, payload)


# ----------------------------------------------------------------------------- losses


def losses(md_root: Path, ls_root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"_meta": {
        "sources": {"megvii-research/mdistiller": commit_of(md_root),
                    "sunshangquan/logit-standardization-KD": commit_of(ls_root)},
        "note": "batch-mean losses of the reference functions on the stored inputs (float32): "
                "kd = kd_loss(student, teacher, T); dkd = dkd_loss(..., alpha, beta, T); "
                "the ls_ entries call the LS repository's functions with logit_stand=True"},
        "cases": []}
    cases = logit_cases()
    settings = [{"temperature": 4.0, "alpha": 1.0, "beta": 8.0}, {"temperature": 1.0, "alpha": 1.0, "beta": 2.0},
                {"temperature": 2.0, "alpha": 0.5, "beta": 4.0}]
    with reference(md_root, "mdistiller"):
        md_kd = importlib.import_module("mdistiller.distillers.KD").kd_loss
        md_dkd = importlib.import_module("mdistiller.distillers.DKD").dkd_loss
        md = [[(md_kd(c["student"], c["teacher"], s["temperature"]).item(),
                md_dkd(c["student"], c["teacher"], c["target"], s["alpha"], s["beta"], s["temperature"]).item())
               for s in settings] for c in cases]
    with reference(ls_root, "mdistiller"):
        ls_kd = importlib.import_module("mdistiller.distillers.KD").kd_loss
        ls_dkd = importlib.import_module("mdistiller.distillers.DKD").dkd_loss
        ls = [[(ls_kd(c["student"], c["teacher"], s["temperature"], True).item(),
                ls_dkd(c["student"], c["teacher"], c["target"], s["alpha"], s["beta"], s["temperature"], True).item())
               for s in settings] for c in cases]
    for c, md_row, ls_row in zip(cases, md, ls):
        out["cases"].append({
            "student": tensor_list(c["student"]), "teacher": tensor_list(c["teacher"]),
            "target": tensor_list(c["target"]),
            "results": [{**s, "kd": kd, "dkd": dkd, "ls_kd": lkd, "ls_dkd": ldkd}
                        for s, (kd, dkd), (lkd, ldkd) in zip(settings, md_row, ls_row)]})
    return out


# ----------------------------------------------------------------------------- KDAS


class _Meters(dict):
    def __missing__(self, key):
        meter = types.SimpleNamespace(avg=0.0, update=lambda *a, **k: None)
        self[key] = meter
        return meter


class _FixedLogits(torch.nn.Module):
    """A stand-in network whose output is a given logits tensor (indexed by the batch's images,
    which carry the row numbers)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, image: torch.Tensor):
        return self.logits[image.long().view(-1)] + 0 * self.anchor, None


class _Distiller:
    """What KDASTrainer.train_iter calls: ``module.get_logits`` for scoring, then the distiller
    on the kept samples (a zero loss: only the selection is recorded)."""

    def __init__(self, student: _FixedLogits, teacher: _FixedLogits) -> None:
        self.student, self.teacher = student, teacher
        self.module = types.SimpleNamespace(get_logits=lambda image: (student(image)[0], teacher(image)[0]))

    def __call__(self, image, target, epoch):
        logits = self.student(image)[0]
        return logits, {"loss": logits.sum() * 0}


def _kdas_cfg(**kdas: Any) -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    defaults = dict(START_RATE=0.6, END_RATE=0.4, SAMPLING_PERIOD=[1, 3, 5, 10], EXCLUSION_RATE=0.0,
                    PENALTY_FACTOR=0.5, PENALTY_LAMBDA=1000.0, PENALTY_WARMUP=0, WARMUP_EPOCHS=0, THRESHOLD=0.2)
    defaults.update(kdas)
    return ns(KDAS=ns(**defaults), SOLVER=ns(TRAINER="kdas", EPOCHS=240, BATCH_SIZE=64),
              KD=ns(TEMPERATURE=4.0, LOSS=ns(CE_WEIGHT=1.0, KD_WEIGHT=1.0)), EXPERIMENT=ns(LOGIT_STAND=False))


def kdas(root: Path) -> dict[str, Any]:
    _stub("tensorboardX", SummaryWriter=object)
    out: dict[str, Any] = {"_meta": {"sources": {"byungchul-chae/kdas_iccv": commit_of(root)}}}
    with reference(root, "mdistiller"):
        trainer_mod = importlib.import_module("mdistiller.engine.trainer")
        kd_mod = importlib.import_module("mdistiller.distillers.KD")

        def trainer(epochs: int, cfg: types.SimpleNamespace):
            t = object.__new__(trainer_mod.KDASTrainer)  # no __init__: no data, optimizer or logger
            t.start_rate, t.end_rate = cfg.KDAS.START_RATE, cfg.KDAS.END_RATE
            t.total_epochs, t.sampling_period_config = epochs, cfg.KDAS.SAMPLING_PERIOD
            t.exclusion_rate, t.warmup_epochs = cfg.KDAS.EXCLUSION_RATE, cfg.KDAS.WARMUP_EPOCHS
            t.target_batch_size, t.cfg = cfg.SOLVER.BATCH_SIZE, cfg
            return t

        # ratio schedule and scoring epochs
        out["schedules"] = []
        for epochs, kw in [(240, {}), (100, {"WARMUP_EPOCHS": 10, "SAMPLING_PERIOD": 5}),
                           (60, {"START_RATE": 0.8, "END_RATE": 0.3, "SAMPLING_PERIOD": [1, 2, 3, 4]}),
                           (8, {"SAMPLING_PERIOD": [1, 4]})]:
            t = trainer(epochs, _kdas_cfg(**kw))
            out["schedules"].append({
                "epochs": epochs, "start_rate": t.start_rate, "end_rate": t.end_rate,
                "sampling_period": t.sampling_period_config, "kdas_warmup": t.warmup_epochs,
                "rate": [t.get_current_rate(e) for e in range(1, epochs + 1)],
                "scoring_epochs": [e for e in range(1, epochs + 1) if t.is_sampling_epoch(e)]})

        # selection from an enlarged batch: the trainer's own train_iter on fixed logits
        out["selections"] = []
        for seed, (n, batch, rate, epoch) in enumerate([(107, 64, 0.0, 3), (107, 64, 0.05, 100),
                                                         (107, 64, 0.05, 200), (40, 64, 0.05, 10),
                                                         (160, 64, 0.2, 1)]):
            g = torch.Generator().manual_seed(100 + seed)
            s_logits, t_logits = torch.randn(n, 10, generator=g) * 3, torch.randn(n, 10, generator=g) * 3
            cfg = _kdas_cfg(EXCLUSION_RATE=rate)
            t = trainer(240, cfg)
            t.target_batch_size = batch
            t.distiller = _Distiller(_FixedLogits(s_logits), _FixedLogits(t_logits))
            t.optimizer = types.SimpleNamespace(zero_grad=lambda: None, step=lambda: None)
            t.do_sample, t.epoch_cached_indices, t.sample_counter = True, [], 0
            images = torch.arange(n, dtype=torch.float32)  # row numbers, read back by _FixedLogits
            with cuda_is_identity():
                t.train_iter((images, torch.randint(0, 10, (n,), generator=g), torch.arange(n) + 1000),
                             epoch, _Meters())
            out["selections"].append({"student": tensor_list(s_logits), "teacher": tensor_list(t_logits),
                                      "batch_size": batch, "exclusion_rate": rate, "epoch": epoch, "epochs": 240,
                                      "index_offset": 1000, "selected": sorted(t.epoch_cached_indices)})

        # the penalty-weighted KD term of the reference KD distiller (KDAS trainer, after warm-up)
        out["penalties"] = []
        for seed, kw in enumerate([{}, {"THRESHOLD": 0.1, "PENALTY_LAMBDA": 2.0, "PENALTY_FACTOR": 0.3},
                                   {"PENALTY_WARMUP": 4, "PENALTY_LAMBDA": 5.0}]):
            g = torch.Generator().manual_seed(200 + seed)
            b = 32
            s_logits, t_logits = torch.randn(b, 10, generator=g) * 3, torch.randn(b, 10, generator=g) * 3
            target = torch.randint(0, 10, (b,), generator=g)
            cfg = _kdas_cfg(**kw)
            distiller = kd_mod.KD(_FixedLogits(s_logits), _FixedLogits(t_logits), cfg)
            by_epoch = {}
            for epoch in (1, 2, 10):
                _, loss = distiller.forward_train(image=torch.arange(b, dtype=torch.float32), target=target,
                                                  epoch=epoch)
                by_epoch[epoch] = loss["loss_kd"].item()
            out["penalties"].append({
                "student": tensor_list(s_logits), "teacher": tensor_list(t_logits), "target": tensor_list(target),
                "temperature": cfg.KD.TEMPERATURE, "threshold": cfg.KDAS.THRESHOLD,
                "penalty_lambda": cfg.KDAS.PENALTY_LAMBDA, "penalty_factor": cfg.KDAS.PENALTY_FACTOR,
                "penalty_warmup": cfg.KDAS.PENALTY_WARMUP, "loss_kd_by_epoch": by_epoch})
    out["_meta"]["note"] = ("schedules: KDASTrainer.get_current_rate / is_sampling_epoch per epoch; selections: "
                            "the dataset indices KDASTrainer.train_iter keeps from one enlarged batch whose "
                            "student/teacher logits are given (indices = row + index_offset); penalties: "
                            "KD.forward_train's loss_kd (batch mean of T^2 KL times the penalty weights)")
    return out


# ----------------------------------------------------------------------------- CTKD


def ctkd(root: Path) -> dict[str, Any]:
    _stub("imgaug"), _stub("imgaug.augmenters")
    out: dict[str, Any] = {"_meta": {"sources": {"zhengli97/CTKD": commit_of(root)},
                                     "note": "curricula: CosineDecay/LinearDecay(max, min, loops).get_value(epoch) "
                                             "for epochs 1..20, as train_student.py calls them; global_t: "
                                             "t_start + t_end * sigmoid(Global_T()(..., lambda)) and the gradient of "
                                             "that temperature times a loss L = temperature w.r.t. global_T"}}
    with reference(root, "train_student", "models", "helper", "distiller_zoo", "crd", "dataset"):
        ts = importlib.import_module("train_student")
        tg = importlib.import_module("models.temp_global")
        out["curricula"] = []
        for cls, (hi, lo, loops) in [("CosineDecay", (0, -1, 10)), ("CosineDecay", (0, -1, 5)),
                                     ("LinearDecay", (0, -1, 10))]:
            decay = getattr(ts, cls)(max_value=hi, min_value=lo, num_loops=loops)
            out["curricula"].append({"class": cls, "max_value": hi, "min_value": lo, "num_loops": loops,
                                     "values": [decay.get_value(e) for e in range(1, 21)]})
        out["global_t"] = []
        # lambda as train_student.py passes it: CosineDecay(0, -1, loops) values are <= 0
        for t_start, t_end, lam in [(1.0, 20.0, -0.5), (2.0, 10.0, -1.0), (1.0, 20.0, -0.0245)]:
            module = tg.Global_T()
            raw = module(None, None, lam)
            temp = t_start + t_end * torch.sigmoid(raw)
            temp.sum().backward()
            out["global_t"].append({"t_start": t_start, "t_end": t_end, "lambda": lam,
                                    "temperature": temp.item(), "grad_theta": module.global_T.grad.item()})
    return out


# ----------------------------------------------------------------------------- feature weights


def _yacs_stub() -> None:
    class CfgNode(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as e:
                raise AttributeError(key) from e

        def __setattr__(self, key, value):
            self[key] = value

    _stub("yacs.config", CfgNode=CfgNode)


def feature_weights(md_root: Path, sa_root: Path) -> dict[str, Any]:
    _yacs_stub()
    _stub("tensorboardX", SummaryWriter=object)  # engine/__init__ imports the trainers
    with reference(md_root, "mdistiller"):
        cfg = importlib.import_module("mdistiller.engine.cfg").CFG
    standalone = {"at": cfg.AT.LOSS.FEAT_WEIGHT, "fitnet": cfg.FITNET.LOSS.FEAT_WEIGHT,
                  "nst": cfg.NST.LOSS.FEAT_WEIGHT, "vid": cfg.VID.LOSS.FEAT_WEIGHT,
                  "sp": cfg.SP.LOSS.FEAT_WEIGHT, "pkt": cfg.PKT.LOSS.FEAT_WEIGHT,
                  "rkd": cfg.RKD.LOSS.FEAT_WEIGHT, "cc": None}  # mdistiller has no CC distiller
    sa_dirs = {"at": "at", "fitnet": "fitnet", "nst": "nst", "vid": "vid", "sp": "sp", "pkt": "pkt",
               "rkd": "rkd", "cc": "cc"}
    sakd = {}
    for name, folder in sa_dirs.items():
        path = sa_root / "configs" / "cifar-100" / "seed-1029" / folder / "resnet56-resnet20.yml"
        weights = yaml.safe_load(path.read_text())["kd"]["loss_weights"]
        sakd[name] = {"other_kd": float(weights["other_kd"]), "classify_weight": float(weights["classify_weight"]),
                      "kd_weight": float(weights["kd_weight"])}
    return {"_meta": {"sources": {"megvii-research/mdistiller": commit_of(md_root),
                                  "zju-vipa/spot-adaptive-pytorch": commit_of(sa_root)},
                      "note": "standalone: mdistiller CFG.<METHOD>.LOSS.FEAT_WEIGHT (engine/cfg.py defaults); "
                              "sakd: SA's configs/cifar-100/seed-1029/<method>/resnet56-resnet20.yml loss_weights"},
            "standalone": {k: None if v is None else float(v) for k, v in standalone.items()}, "sakd": sakd}


# ----------------------------------------------------------------------------- model manifest


def manifest(md_root: Path) -> dict[str, Any]:
    with reference(md_root, "mdistiller"):
        cifar = importlib.import_module("mdistiller.models.cifar")
        shapes, counts = {}, {}
        # in the order the package defines the builders (its __init__'s imports)
        order = list(vars(cifar))
        entries = sorted(cifar.cifar_model_dict.items(), key=lambda kv: order.index(kv[1][0].__name__))
        for name, (builder, _) in entries:
            model = builder(num_classes=100)
            shapes[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
            counts[name] = sum(p.numel() for p in model.parameters())
    return {"_meta": {"source": f"megvii-research/mdistiller mdistiller/models/cifar @ {commit_of(md_root)}",
                      "num_classes": 100, "in_channels": 3,
                      "note": "state_dict() key -> shape of each model in mdistiller's cifar_model_dict, "
                              "and its parameter count"},
            "param_counts": counts, "state_dicts": shapes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("mdistiller", "ls", "kdas", "ctkd", "sa"):
        p.add_argument(f"--{flag}", type=Path, required=True)
    # the newer methods: each file is made when its checkouts are given
    p.add_argument("--repdistiller", type=Path, help="HobbitLong/RepDistiller (CRD, cross-checked with mdistiller)")
    p.add_argument("--mlkd", type=Path, help="Jin-Ying/Multi-Level-Logit-Distillation (MLKD, with --ls)")
    p.add_argument("--dist", type=Path, help="hunto/DIST_KD, with its classification submodule (DIST)")
    p.add_argument("--ttm", type=Path, help="zkxufo/TTM (WTTM)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    args = p.parse_args(argv)
    # The per-method generators (goldens_<method>.py, beside this file) import this module by
    # name: run as a script it is __main__, so they get this one (and its list of stubs).
    sys.modules.setdefault("reference_goldens", sys.modules[__name__])
    import goldens_crd
    import goldens_dist
    import goldens_mlkd
    import goldens_reviewkd
    import goldens_wttm

    torch.manual_seed(0)
    makers = {"reference_losses.json": lambda: losses(args.mdistiller, args.ls),
              "reference_kdas.json": lambda: kdas(args.kdas),
              "reference_ctkd.json": lambda: ctkd(args.ctkd),
              "reference_feature_weights.json": lambda: feature_weights(args.mdistiller, args.sa),
              "mdistiller_cifar_shapes.json": lambda: manifest(args.mdistiller),
              "reference_reviewkd.json": lambda: goldens_reviewkd.generate(args.mdistiller),
              "reference_crd.json": lambda: goldens_crd.generate(args.mdistiller, args.repdistiller)}
    if args.mlkd:
        makers["reference_mlkd.json"] = lambda: goldens_mlkd.generate(args.mlkd, args.ls)
    if args.dist:
        makers["reference_dist.json"] = lambda: goldens_dist.generate(args.dist)
    if args.ttm:
        makers["reference_wttm.json"] = lambda: goldens_wttm.generate(args.ttm)
    for name, make in makers.items():
        before = len(STUBBED)
        payload = make()
        # the imports this file's reference needed
        write_golden(args.out / name, payload, "tests/tools/reference_goldens.py", STUBBED[before:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
