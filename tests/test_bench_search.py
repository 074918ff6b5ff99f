"""``kdtune bench --search``: the arithmetic of its figures (the searches themselves are
too slow for the suite; docs/performance.md gives the command and what it measured)."""
from __future__ import annotations

import math
import subprocess
import sys

from kdtune.search.bench_search import best_completed, time_to_target


def rows(*events):
    return [{"timestamp": i, "trial": t, "epoch": e, "seconds": s, "value": v, "completed": c}
            for i, (t, e, s, v, c) in enumerate(events)]


def test_time_to_target_counts_every_trial_second_until_a_completed_trial_gets_there() -> None:
    run = rows(("a", 1, 2.0, 90.0, False),   # high at epoch 1, then stopped: not a full-budget value
               ("b", 1, 3.0, 50.0, False), ("b", 2, 3.0, 97.8, True),
               ("c", 1, 1.0, 60.0, False), ("c", 2, 1.0, 98.4, True))
    assert time_to_target(run, 97.5) == 8.0  # 2 + 3 + 3: b completes at 97.8
    assert time_to_target(run, 98.0) == 10.0  # every second, c completes at 98.4
    assert math.isinf(time_to_target(run, 99.0))
    assert best_completed(run) == 98.4
    assert best_completed(rows(("a", 1, 2.0, 90.0, False))) == -math.inf


def test_bad_strategy_exits_2_before_any_search() -> None:
    r = subprocess.run([sys.executable, "-m", "kdtune.bench", "--search", "--strategies", "tpe,bogus"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bogus" in r.stderr and "Traceback" not in r.stderr
