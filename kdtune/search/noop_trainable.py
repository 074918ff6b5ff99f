"""The no-op trial of ``kdtune bench --overhead`` (kdtune.search.bench_overhead): kdtune's
trainable with its epoch replaced by a sleep. Its own module, imported only when a benchmark runs,
so that the command checks its flags without importing torch and Ray."""
from __future__ import annotations

import math
import os
import time
from typing import Any

from kdtune.search.trainable import KDTrainable


class NoopTrainable(KDTrainable):
    """A trial whose epoch is ``step_s`` seconds of sleep: no data, no model, no teacher. Its
    checkpoint is the size of a resnet8's weights and momentum (what a digits trial saves), so a
    checkpoint (``checkpoint_every_s``) costs what it costs in a real search."""

    step_s = 0.0

    def _build(self, config: dict[str, Any]) -> None:
        import torch

        self._last_checkpoint = time.monotonic()
        self.config_values = dict(config)
        self.epoch = 0
        self.max_epochs = self.spec.max_epochs
        self.state = torch.zeros(2 * 78_000)  # resnet8: 78k parameters, plus SGD momentum

    def _accuracy(self) -> float:
        lr = float(self.config_values.get("lr") or 0.1)
        wd = float(self.config_values.get("weight_decay") or 5e-4)
        # best near lr 0.1, weight decay 5e-4; approaches its final value epoch by epoch
        final = 95.0 - 12.0 * (math.log10(lr) + 1.0) ** 2 - 4.0 * (math.log10(wd) + 3.3) ** 2
        return max(final, 10.0) * (1.0 - 0.5 ** self.epoch)

    def step(self) -> dict[str, Any]:
        if self.step_s > 0:
            time.sleep(self.step_s)
        self.epoch += 1
        acc = self._accuracy()
        return self.checkpoint_when_due({"val/acc1": acc, "train/loss": 2.3 * (1.0 - acc / 100.0), "train/lr": 0.1,
                                         "diverged": 0.0, "samples/backprop": 0,
                                         "done": self.epoch >= self.max_epochs})

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        import torch

        torch.save({"epoch": self.epoch, "state": self.state}, os.path.join(checkpoint_dir, "noop.pth"))
        self._last_checkpoint = time.monotonic()

    def load_checkpoint(self, checkpoint: str) -> None:
        import torch

        saved = torch.load(os.path.join(checkpoint, "noop.pth"), weights_only=True)
        self.epoch, self.state = saved["epoch"], saved["state"]


def sleeping(step_s: float) -> type[NoopTrainable]:
    """NoopTrainable with this epoch time (a class attribute: Tune pickles the class by reference)."""
    if step_s <= 0:
        return NoopTrainable
    return type(f"NoopTrainable{int(step_s * 1000)}ms", (NoopTrainable,), {"step_s": step_s,
                                                                            "__module__": __name__})
