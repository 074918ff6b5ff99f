"""What a method test checks beyond finite numbers: the student learns on digits."""
from __future__ import annotations

import math

CHANCE = 10.0  # digits: 10 balanced classes, top-1 in percent


def assert_learns(metrics: list[dict], *, loss: str = "train/loss", min_acc: float = 3 * CHANCE,
                  label: object = "") -> None:
    """Every epoch's metrics are finite, the training loss falls from the first epoch to the
    last, and the last validation accuracy beats chance by a clear margin."""
    assert len(metrics) >= 2, label
    for m in metrics:
        bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, (label, bad)
    losses = [m[loss] for m in metrics]
    accs = [m["val/acc1"] for m in metrics]
    assert losses[-1] < losses[0], (label, loss, losses, accs)
    assert accs[-1] > min_acc, (label, losses, accs)
