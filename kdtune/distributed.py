"""Data-parallel training: one run on several processes (GPUs or CPU workers), as one process.

The engine stays the same loop; :class:`Workers` is what it asks when it runs on several:

* every rank draws the same global batch from the same seeded generator and trains on its
  contiguous shard of it (:meth:`Workers.shard`), so the global batch is the one-process batch;
* DDP averages gradients, and the engine scales each rank's loss by its share of the global
  batch, so that uneven shards (an epoch's short last batch) still give the one-process mean;
* batch norm is synchronised (:func:`sync_batch_norm`), so batch statistics are the global
  batch's, as in one process;
* metrics are sums reduced across ranks (:meth:`Workers.sum`) before anything reads them.

Ray Train (``TorchTrainer``) starts the processes and the process group (NCCL on GPUs, gloo on
CPUs); kdtune.search.ddp runs a trial that way. Nothing here depends on Ray: any launcher that
initialises ``torch.distributed`` works (the tests use two spawned gloo processes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class Workers:
    """This process's place among the ``world`` processes of one data-parallel run."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> Workers | None:
        """The default process group's ranks, or None when this run is one process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, t: Tensor) -> Tensor:
        """This rank's contiguous part of ``t`` (dim 0): sizes differ by at most one, lower ranks
        first, so the ranks' parts in rank order are ``t``."""
        return t.tensor_split(self.world)[self.rank]

    def sum(self, values: list[Tensor]) -> list[Tensor]:
        """Each of ``values`` (scalars) summed over the ranks: one collective for them all.
        float64, so that counts and sums of an epoch add up exactly as in one process."""
        stacked = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values])
        dist.all_reduce(stacked)
        return list(stacked.unbind())

    def gather(self, t: Tensor) -> Tensor:
        """The ranks' shards ``t`` (dim 0, sizes may differ by rank) concatenated in rank
        order: what :meth:`shard` split. Collectives need one size, so shards are padded."""
        size = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def loss_scale(self, local: int, total: int) -> float:
        """Factor on this rank's mean loss over ``local`` of the global batch's ``total`` samples:
        DDP averages the ranks' gradients, so ``world * local / total`` makes that average the
        gradient of the global batch's mean loss (1 when the shards are equal)."""
        return self.world * local / total if total else 0.0

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel.

        ``find_unused_parameters``: KD, KDAS, CTKD and SAKD use every trainable parameter in
        every step (checked on two gloo processes), but a method that leaves one out of a step's
        graph would make DDP fail at the next step; finding them costs one walk over the graph
        per step. No buffer broadcast before each forward: synchronised BN keeps the running
        statistics equal on every rank, and the frozen teacher's never change."""
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True,
                                                   forward_sync_buffers=False)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of every rank's input is the sum of the
    ranks' output gradients (each rank's loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch on CPU processes (gloo).

    ``nn.SyncBatchNorm`` is the same layer on GPUs, but torch has no CPU kernels for it
    (``batch_norm_stats``); this one computes the same statistics from per-rank sums reduced
    with the differentiable ``all_reduce``, so autograd gives the same gradients. Eval mode
    uses the running statistics, as every BN layer does. Statistics are summed in float64; it
    is meant for the CPU path's tests, not for speed (GPUs use torch's).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=torch.float64, device=x.device)
        # float64 sums: the variance as E[x²] - E[x]² would lose digits to cancellation in float32
        xd = x.double()
        # one collective for count, sum and sum of squares: [1 + 2C]
        stats = _AllReduceSum.apply(torch.cat([count, xd.sum(dims), (xd * xd).sum(dims)]))
        n = stats[0]
        mean = stats[1:1 + x.shape[1]] / n
        var = (stats[1 + x.shape[1]:] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach().float())
                unbiased = (var.detach() * n / (n - 1).clamp_min(1)).float()
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        xf, mean, var = x.float(), mean.float(), var.float()
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its BN layers synchronised across the ranks: ``nn.SyncBatchNorm`` on GPUs,
    :class:`CPUSyncBatchNorm` on CPUs. Weights, buffers and train mode carry over."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out
