"""The trial scheduler behind ``scheduler.type``: Ray Tune's own objects, nothing re-implemented.

* ``asha``: ``ASHAScheduler`` (asynchronous successive halving; rungs at grace_period x rf^k).
* ``hyperband``: ``HyperBandScheduler`` (synchronous brackets; it pauses trials at a rung and
  resumes them from the checkpoints Tune saves when it pauses them). Its brackets
  come from ``max_t`` (fixed.epochs) and ``reduction_factor``; ``grace_period`` does not apply.
* ``median``: ``MedianStoppingRule`` (stop a trial whose best value so far is worse than the median
  of the other trials' running averages at the same epoch, from ``grace_period`` on).
* ``pbt`` / ``pb2``: ``PopulationBasedTraining`` / ``PB2`` (kdtune.search.pbt): every
  ``perturbation_interval`` epochs the bottom trials copy a top trial's checkpoint and go on with
  its hyperparameters mutated (PB2: chosen by a Gaussian-process bandit), within the space.
* ``none``: ``FIFOScheduler`` (every trial runs all its epochs).
"""
from __future__ import annotations

from typing import Any

from kdtune.search.spec import SearchSpec

TIME_ATTR = "training_iteration"  # one step of KDTrainable is one epoch


def build_scheduler(spec: SearchSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    if spec.scheduler == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=spec.max_epochs, grace_period=spec.grace_period,
                             reduction_factor=spec.reduction_factor)
    if spec.scheduler == "hyperband":
        return HyperBandScheduler(time_attr=TIME_ATTR, max_t=spec.max_epochs, reduction_factor=spec.reduction_factor)
    if spec.scheduler == "median":
        return MedianStoppingRule(time_attr=TIME_ATTR, grace_period=spec.grace_period)
    if spec.scheduler in ("pbt", "pb2"):
        from kdtune.search import pbt

        return pbt.build(spec, TIME_ATTR)
    return FIFOScheduler()
