"""Behaviour fingerprint of kdtune: model outputs and state dicts, every method's loss terms on
fixed inputs, and the metrics of a fixed-seed digits run for every method.

Refactors must leave it unchanged (``tests/test_fingerprint.py`` compares it with the committed
``tests/data/fingerprint.json``, within tolerances that float noise stays inside). Regenerate only
for a deliberate change of behaviour, and say which entries moved and why in the commit message:

    python tests/tools/fingerprint.py > tests/data/fingerprint.json

The noise another CPU or torch wheel brings is measured by running it with other kernels and
comparing: ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 python tests/tools/fingerprint.py``.
"""
from __future__ import annotations

import json
import sys

import torch

# Method hyperparameters for the entries that need more than the defaults on these pairs.
METHOD_PARAMS: dict[str, dict] = {"sakd": {"feature_loss": "at"}, "crd": {"nce_k": 16}}
# Methods whose fixed-input losses and digits run use the same-family pair below.
PAIR = ("resnet20", "resnet8")


BLOCK = 1 << 16  # elements of a direction converted to float64 at a time


def projections(t: torch.Tensor, k: int = 4, seed: int = 0) -> list[float]:
    """``k`` fixed random projections of ``t`` (float64): numbers a tolerance can compare, that
    move when any element moves (a hash of the float bits moves with the last bit as well)."""
    flat = t.detach().double().reshape(-1).cpu()
    g = torch.Generator().manual_seed(seed)
    # float32 directions (a quarter of float64's drawing time: ResNet50's 23 M weights), summed in
    # float64 a block at a time: converting a whole direction to float64 at once (190 MB for
    # ResNet50) cost 40 % of the models part. A tensor of up to BLOCK elements is one dot product,
    # as before; a longer one sums its blocks' in order (the same values to the 6 decimals kept).
    block = torch.empty(min(BLOCK, flat.numel()), dtype=torch.float64)
    out = []
    for _ in range(k):
        direction = torch.randn(flat.numel(), generator=g)
        total = 0.0
        for i in range(0, flat.numel(), BLOCK):
            part = block[:min(BLOCK, flat.numel() - i)]
            part.copy_(direction[i:i + BLOCK])
            total += float(flat[i:i + BLOCK] @ part)
        out.append(round(total, 6))
    return out


def model_summary(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """A model's outputs on ``x`` and its initial weights as a few numbers each."""
    with torch.no_grad():
        logits, _ = model(x)
    state = [v for _, v in sorted(model.state_dict().items()) if v.is_floating_point()]
    flat = torch.cat([v.detach().double().reshape(-1) for v in state])
    return {"logits": projections(logits), "logit_sum": round(float(logits.double().sum()), 6),
            "params": flat.numel(), "state": projections(flat, seed=1),
            "state_sq": round(float((flat * flat).sum()), 6)}


def models() -> dict[str, dict]:
    from kdtune.models import MODELS, build_model

    out = {}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in MODELS.names():
        torch.manual_seed(0)
        out[name] = model_summary(build_model(name, num_classes=100).eval(), x)
    return out


def losses() -> dict[str, dict]:
    from kdtune.distillers import METHODS, build_distiller
    from kdtune.models import build_model

    out = {}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 100, (8,), generator=g)
    for method in METHODS.names():
        torch.manual_seed(0)
        teacher = build_model(PAIR[0], num_classes=100)
        student = build_model(PAIR[1], num_classes=100)
        distiller = build_distiller(method, student, teacher if METHODS.get(method).needs_teacher else None,
                                    input_shape=(3, 32, 32), **METHOD_PARAMS.get(method, {}))
        distiller.train()
        distiller.on_epoch_start(30, 240)
        extra = {}
        if distiller.needs_indices:  # CRD: a memory over a training set of 64 images, this batch its first 8
            distiller.bind_train_set(torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(3)))
            extra["indices"] = torch.arange(8)
        torch.manual_seed(2)  # methods that draw (SAKD's Gumbel gates, CRD's negatives) draw the same numbers
        _, terms = distiller(x, y, **extra)
        out[method] = {k: round(float(v.detach().float().mean()), 6) for k, v in sorted(terms.items())}
    return out


def digits_runs() -> dict[str, dict]:
    from kdtune.config import RunConfig
    from kdtune.data import load_dataset
    from kdtune.distillers import METHODS
    from kdtune.models import build_model
    from kdtune.run import build_engine

    data = load_dataset("digits", val_size=200)
    out = {}
    runs = {m: {"method": m, **METHOD_PARAMS.get(m, {})} for m in METHODS.names()}
    runs["kd+kdas"] = {"method": "kd", "sampler": "kdas", "sampling_period": "1,2"}
    for name, values in runs.items():
        cfg = RunConfig.from_dict({"dataset": "digits", "teacher": "resnet8", "student": "resnet8",
                                   "epochs": 2, "batch_size": 128, "seed": 0, "device": "cpu",
                                   # the live teacher, as recorded; tests/test_teacher_cache.py
                                   # compares cache-on runs with these
                                   "teacher_cache": "off", **values})
        torch.manual_seed(123)
        teacher = build_model("resnet8", num_classes=10, in_channels=1) if METHODS.get(cfg.method).needs_teacher else None
        engine = build_engine(cfg, data, teacher)
        metrics = list(engine.run())[-1]
        out[name] = {k: round(float(v), 5) for k, v in sorted(metrics.items())
                     if isinstance(v, (int, float)) and "time" not in k and "per_s" not in k}
    return out


PARTS = {"models": models, "losses": losses, "digits": digits_runs}


def compute(names) -> dict[str, dict]:
    """The parts ``names``, computed as recorded: one thread, deterministic algorithms. Those are set
    for the call and restored after it (tests/test_fingerprint.py computes the parts in its own
    process, where the other tests run with their own settings)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        return {name: PARTS[name]() for name in names}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def main(argv: list[str]) -> None:
    """All parts, or the ones named on the command line."""
    json.dump(compute(argv or PARTS), sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
