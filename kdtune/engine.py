"""The training loop: one distillation run, epoch by epoch, with nothing but torch inside.

``Engine.run()`` yields one metrics dict per epoch; ``kdtune train``, the teacher
trainer and the Ray Tune trainable all consume that same generator. Inside an epoch there
is no host synchronisation: losses and accuracies accumulate on the device and are read once
at the end of the epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import Tensor

from kdtune.data import ImageData
from kdtune.devices import cpu_rng_state
from kdtune.distributed import Workers, sync_batch_norm
from kdtune.distillers import Distiller
from kdtune.hparams import Problem, Schema, declare

SCHEDULES = ("step", "cosine", "constant")


# An SGD parameter group's settings (base_lr: kdtune's, the LR before the schedule's factor)
OPTIMIZER_SETTINGS = ("base_lr", "momentum", "weight_decay", "nesterov", "dampening")


def _milestones(value: Any) -> None:
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in value):
        raise ValueError(f"must be a list of positive integers, but got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule. Defaults are the CIFAR-100 reference (mdistiller) recipe.

    ``lr_decay_epochs`` are given for a 240-epoch run and scaled to ``epochs``, so a
    24-epoch run decays at 15/18/21. Each field is declared here once (:data:`RECIPE` reads
    them); :class:`kdtune.config.RunConfig` takes them as flat keys with these rules.
    """

    epochs: int = declare(240, ge=1, help="training epochs", not_searchable=(
        "it is the budget that early stopping and max_epochs count in; set it under fixed"))
    batch_size: int = declare(64, ge=1, help="images per SGD step")
    lr: float = declare(0.05, gt=0, help="base learning rate")
    momentum: float = declare(0.9, ge=0, lt=1, help="SGD momentum")
    weight_decay: float = declare(5e-4, ge=0, help="SGD weight decay")
    nesterov: bool = declare(False, help="Nesterov momentum (needs momentum > 0)")
    schedule: str = declare("step", choices=SCHEDULES, help="learning-rate schedule")
    lr_decay_epochs: tuple[int, ...] = declare((150, 180, 210), type=(list, tuple), parse=_milestones,
                                               help="step-schedule milestones, given for 240 epochs")
    lr_decay_rate: float = declare(0.1, gt=0, le=1, help="step-schedule factor")
    # the KDAS code's eta_min
    lr_min: float = declare(1e-5, ge=0, help="cosine floor (must also be < lr)")
    warmup_epochs: int = declare(0, ge=0, help="linear warm-up epochs (must be < epochs)")

    @staticmethod
    def check(values: dict[str, Any]) -> list[Problem]:
        """The rules across the recipe's fields (each field's own rule is its declaration);
        ``values`` holds every field, of the right type."""
        problems = []
        if values["lr_min"] >= values["lr"] > 0:
            problems.append(Problem("lr_min", "must be in [0, lr)", values["lr_min"]))
        if values["warmup_epochs"] >= values["epochs"] >= 1:
            problems.append(Problem("warmup_epochs", "must be in [0, epochs)", values["warmup_epochs"]))
        if values["nesterov"] and values["momentum"] == 0:
            problems.append(Problem("nesterov", "must be false when momentum is 0 (SGD requires momentum > 0)",
                                    values["nesterov"]))
        return problems

    def lr_factor(self, epoch: int) -> float:
        """LR multiplier for 1-based ``epoch``."""
        if epoch <= self.warmup_epochs:
            return epoch / self.warmup_epochs
        if self.schedule == "step":
            milestones = [round(m * self.epochs / 240) for m in self.lr_decay_epochs]
            return self.lr_decay_rate ** sum(epoch > m for m in milestones)
        if self.schedule == "cosine":
            cos = (1 + math.cos(math.pi * (epoch - 1) / self.epochs)) / 2
            return (self.lr_min + (self.lr - self.lr_min) * cos) / self.lr
        return 1.0


RECIPE = Schema.of(Recipe)  # the recipe's keys, as RunConfig, --list and the docs read them


class SamplePolicy(Protocol):
    """Chooses an epoch's batches and weights samples' distillation terms (KDAS plugs in here).

    ``batches`` yields ``(images, labels, train indices, views, teacher logits or None)``
    (``views`` as the loader reports them); teacher logits it already computed are reused by
    the distiller instead of a second forward. A policy that needs teacher logits gets them
    from :meth:`Engine.teacher_logits`, which reads the teacher-output cache when there is one.
    """

    def batches(self, epoch: int, engine: Engine) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]]: ...

    def needs_teacher_logits(self, epoch: int) -> bool: ...

    def weights(self, teacher_logits: Tensor | None, target: Tensor, epoch: int) -> Tensor | None: ...

    def epoch_metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Engine:
    """Trains ``distiller`` on ``data`` with ``recipe``.

    Args:
        distiller: a :class:`Distiller` already on ``device``.
        data: the dataset; ``final=True`` trains on train+val and evaluates on test.
        seed: seeds the batch order and augmentation (model init is seeded by the caller).
        amp: bf16 autocast for training; default on for CUDA, off on CPU (evaluation is fp32).
        channels_last: NHWC activations; default on for CUDA, where cuDNN's NHWC kernels
            are what bf16 tensor cores prefer.
        sampler: optional :class:`SamplePolicy` choosing each epoch's samples.
        teacher_cache: optional :class:`kdtune.teacher_cache.TeacherCache` built over this
            engine's loader (same train images, views and precision): the teacher's logits are
            read from it by (index, view) instead of running the teacher. Or a function that
            opens (and if needed builds) it, called at the first epoch, so that building an
            engine stays cheap.
        compile: ``torch.compile`` the distiller's forward (and so, through AOTAutograd, its
            backward); on CUDA with mode ``reduce-overhead`` (CUDA graphs). Shapes are static:
            full batches run the compiled graph, a short batch (an epoch's last one; KDAS's last
            selection of an epoch) runs eagerly, so nothing is padded or dropped and BN batch
            statistics stay exact.
        workers: this process's rank when the run is data-parallel over several processes
            (:mod:`kdtune.distributed`; ``torch.distributed`` already initialised). Every rank
            builds the same engine; each trains on its shard of the one-process global batch.
    """

    def __init__(self, distiller: Distiller, data: ImageData, recipe: Recipe, *,
                 device: torch.device | str = "cpu", seed: int = 0, final: bool = False,
                 amp: bool | None = None, channels_last: bool | None = None,
                 sampler: SamplePolicy | None = None, eval_batch_size: int = 512,
                 teacher_cache: Any = None, compile: bool = False, workers: Workers | None = None) -> None:
        self.device = torch.device(device)
        self.workers = workers
        if workers is not None:
            _check_data_parallel(distiller)
            # batch statistics over the global batch, as in one process (before the optimizer and
            # DDP see the module: the layers are swapped, their parameters kept)
            distiller = sync_batch_norm(distiller, self.device)
        self.recipe = recipe
        self.distiller = distiller
        self.sampler = sampler
        self.final = final
        data = data.for_final() if final else data
        self.data = data
        self.eval_name = "test" if final else "val"
        cuda = self.device.type == "cuda"
        self.amp = cuda if amp is None else amp
        channels_last = cuda if channels_last is None else channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if cuda:
            torch.backends.cudnn.benchmark = True
        distiller.to(memory_format=self.memory_format)
        # A method that trains on a strong view too (MLKD) names its augmentation; only then
        # does the loader make that view (TrainLoader.strong_images).
        # The data makes its loaders: GPU-resident tensors (CIFAR, digits) or a stream of decoded
        # files (imagenet); both yield (images, labels, indices, views) on the device.
        self.loader = data.train_loader(batch_size=recipe.batch_size, device=self.device, seed=seed,
                                        channels_last=channels_last, strong_view=distiller.strong_view)
        if workers is not None and not hasattr(self.loader, "draws"):
            # The streaming loader draws whole batches in its DataLoader workers; it has no shard
            # per rank yet (TrainLoader.draws), so each rank would train on the full batch.
            raise ValueError("several workers per trial need an in-memory dataset (cifar100, cifar10, digits); "
                             "a streaming dataset (imagenet) runs one process per trial")
        self.loader.workers = workers  # every rank draws the same batches and trains on its shard
        if distiller.needs_indices:
            # A method with a memory over the training set (CRD) sizes it from the split trained on
            # here (train+val in a final run), and is handed each batch's indices (_distill).
            distiller.bind_train_set(data.train.labels)
        eval_split = data.test if final else data.val
        self.eval_set = data.eval_batches(eval_split, batch_size=eval_batch_size, device=self.device)
        self.eval_shard = self.eval_set if workers is None else [
            (workers.shard(x), workers.shard(y)) for x, y in self.eval_set if workers.shard(y).shape[0]]
        groups = distiller.param_groups()
        for g in groups:
            g["base_lr"] = recipe.lr * g.pop("lr_scale", 1.0)
            g["lr"] = g["base_lr"]
        self.optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                                         weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
        self.teacher_cache = teacher_cache
        self.teacher_cache_opener = None
        if callable(teacher_cache):
            self.teacher_cache, self.teacher_cache_opener = None, teacher_cache
        # What a step runs: the distiller, or DDP around it, which averages the ranks' gradients.
        # Everything else (evaluation, KDAS's scoring, state) uses the distiller itself.
        self.model = distiller if workers is None else workers.wrap(distiller, self.device)
        self.compiled = None
        if compile:
            # no CUDA graphs under DDP: its gradient hooks run collectives outside any graph
            self.compiled = torch.compile(self._distill, dynamic=False,
                                          mode="reduce-overhead" if cuda and workers is None else None)
        self.epoch = 0  # epochs completed
        self.samples_backprop = 0  # cumulative samples that went through a backward pass

    # ------------------------------------------------------------------ loop

    def run(self) -> Iterator[dict[str, float]]:
        """Train the remaining epochs, yielding each epoch's metrics."""
        while self.epoch < self.recipe.epochs:
            yield self.train_epoch()

    def train_epoch(self) -> dict[str, float]:
        epoch = self.epoch + 1
        start = time.perf_counter()
        lr_factor = self.recipe.lr_factor(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
        self.distiller.on_epoch_start(epoch, self.recipe.epochs)
        self.distiller.train()
        sampler = self.sampler
        batches = (sampler.batches(epoch, self) if sampler is not None
                   else ((x, y, idx, views, None) for x, y, idx, views in self.loader.batches()))
        if self.teacher_cache_opener is not None:
            self.teacher_cache, self.teacher_cache_opener = self.teacher_cache_opener(), None
        cache = self.teacher_cache

        sums: dict[str, Tensor] = {}
        correct1 = torch.zeros((), device=self.device, dtype=torch.long)
        correct5 = torch.zeros_like(correct1)
        seen = 0
        for x, y, idx, views, teacher in batches:
            x = x.contiguous(memory_format=self.memory_format)
            strong = (self.loader.strong_images(idx).contiguous(memory_format=self.memory_format)
                      if self.loader.strong_view is not None else None)
            if teacher is None and cache is not None:
                teacher = cache.lookup(idx, views)  # a device gather; no teacher forward
            with self.autocast():
                if teacher is None and sampler is not None and sampler.needs_teacher_logits(epoch):
                    teacher = self.distiller.teacher_logits(x)
                if self.compiled is not None and y.shape[0] == self.recipe.batch_size:
                    if self.device.type == "cuda":  # a new step: CUDA-graph outputs of the last may be reused
                        torch.compiler.cudagraph_mark_step_begin()
                    logits, losses = self.compiled(x, y, teacher, idx, strong)
                else:
                    logits, losses = self._distill(x, y, teacher, idx, strong)
            weights = sampler.weights(teacher, y, epoch) if sampler is not None else None
            if weights is not None:  # per-sample weights scale the distillation terms, never CE
                keep = self.distiller.unweighted_terms
                losses = {k: v if k in keep else v * weights for k, v in losses.items()}
            if self.workers is None:
                loss = sum(term.mean() for term in losses.values())
            else:  # this rank's share of the global batch (Workers.loss_scale); a rank may get no
                # sample of a short last batch: its sum (0) keeps it in the collective, a mean would be NaN
                loss = sum(term.mean() if term.numel() else term.sum() for term in losses.values())
                loss = loss * self._loss_scale(y.shape[0])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            # Accumulate on the device; reading a value here would stall the pipeline.
            for name, term in losses.items():
                term_sum = term.detach().float().sum()
                sums[name] = sums[name] + term_sum if name in sums else term_sum
            c1, c5 = _correct(logits.detach(), y)
            correct1 += c1
            correct5 += c5
            seen += y.shape[0]
        if self.workers is not None:  # the global batch's sums and counts, before anything reads them
            *term_sums, correct1, correct5, total = self.workers.sum(
                [*sums.values(), correct1, correct5, torch.tensor(seen, device=self.device)])
            sums, seen = dict(zip(sums, term_sums)), int(total.item())
        self.samples_backprop += seen
        self.epoch = epoch

        metrics: dict[str, float] = {"epoch": epoch}
        values = {k: v.item() / max(seen, 1) for k, v in sums.items()}  # host reads: epoch end only
        metrics["train/loss"] = sum(values.values())
        metrics.update({f"train/loss_{k}": v for k, v in values.items()})
        metrics["train/acc1"] = 100.0 * correct1.item() / max(seen, 1)
        metrics["train/acc5"] = 100.0 * correct5.item() / max(seen, 1)
        metrics["lr"] = self.recipe.lr * lr_factor
        metrics["samples/epoch"] = seen
        metrics["samples/backprop"] = self.samples_backprop
        metrics.update(self.distiller.epoch_metrics())
        if sampler is not None:
            metrics.update(sampler.epoch_metrics())
        metrics.update(self.evaluate())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics["time/epoch_s"] = time.perf_counter() - start
        return metrics

    def _distill(self, x: Tensor, y: Tensor, teacher: Tensor | None, idx: Tensor,
                 strong: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        extra: dict[str, Tensor] = {}
        if self.distiller.needs_indices:  # memory rows (CRD)
            extra["indices"] = idx
        if strong is not None:  # the strong view of the same samples (MLKD)
            extra["strong"] = strong
        return self.model(x, y, teacher_logits=teacher, **extra)

    def _loss_scale(self, local: int) -> Tensor:
        """:meth:`Workers.loss_scale` for this step, the global batch size summed on the device
        (a collective but no host read: the step stays asynchronous on GPUs)."""
        assert self.workers is not None
        total = self.workers.sum([torch.tensor(float(local), device=self.device)])[0]
        return (self.workers.world * local / total).float()

    def teacher_logits(self, x: Tensor, indices: Tensor, views: Tensor) -> Tensor:
        """The teacher's logits for images ``x`` (train ``indices`` in ``views``): from the
        teacher-output cache when there is one, else a teacher forward (under the caller's autocast)."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(indices, views)
        return self.distiller.teacher_logits(x)

    def evaluate(self) -> dict[str, float]:
        """Student top-1/top-5 and CE on the selection split (val; test in final runs)."""
        if not self.eval_set:
            return {}
        # fp32 even when training runs in bf16: top-1 on bf16 logits (spacing 0.0625 near 10)
        # ties often, ties go to the lower class index, and the search ranks on this number.
        sums = evaluation_sums(self.distiller.student, self.eval_shard, self.device, amp=False,
                               memory_format=self.memory_format)
        if self.workers is not None:  # each rank evaluated its shard of every batch
            sums = torch.stack(self.workers.sum(list(sums)))
        result = _eval_metrics(sums)
        return {f"{self.eval_name}/{k}": v for k, v in result.items()}

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this run stopped."""
        state = {
            "epoch": self.epoch,
            "samples_backprop": self.samples_backprop,
            "distiller": self.distiller.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "recipe": asdict(self.recipe),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], keep_hyperparameters: bool = False) -> None:
        """Continue from ``state``. ``keep_hyperparameters``: this engine's optimizer settings (base
        LR, momentum, weight decay per parameter group) over those saved with the state, whose
        weights and momentum buffers are still taken: what a PBT trial needs after copying another
        trial's checkpoint with mutated hyperparameters (the method's and sampler's own come from
        their constructors either way)."""
        loader_rng = self._loader_rng(state["loader"])  # checked before anything is changed
        own = [{k: g[k] for k in OPTIMIZER_SETTINGS if k in g} for g in self.optimizer.param_groups]
        self.epoch = state["epoch"]
        self.samples_backprop = state["samples_backprop"]
        self.distiller.load_trainable_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        if keep_hyperparameters:
            for group, settings in zip(self.optimizer.param_groups, own):
                group.update(settings)
        # RNG states go back as CPU ByteTensors whatever the checkpoint was mapped to (a state
        # loaded with map_location=<cuda device> would otherwise fail here with a TypeError).
        self.loader.load_state_dict({**state["loader"], "generator": loader_rng})
        torch.set_rng_state(cpu_rng_state(state["torch_rng"]))
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(cpu_rng_state(state["cuda_rng"]), self.device)
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])

    def _loader_rng(self, loader_state: dict[str, Any]) -> Tensor:
        """The saved loader generator state, checked against this engine's kind of device:
        CPU and CUDA generators keep states of different sizes and draw different streams."""
        saved = cpu_rng_state(loader_state["generator"])
        if saved.numel() != self.loader.generator.get_state().numel():
            raise ValueError(f"checkpoint: its batch-order state was saved on a different kind of device "
                             f"({saved.numel()} bytes; a {self.device.type} generator keeps "
                             f"{self.loader.generator.get_state().numel()}); resume on the kind of device "
                             f"(cpu or cuda) that wrote it")
        return saved


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, amp: bool = False,
                   memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """``loss`` (CE), ``acc1`` and ``acc5`` of ``model`` in eval mode over ``batches`` (a list held on
    the model's device, or a streaming dataset's :class:`kdtune.imagenet.StreamingEval`).

    ``amp`` runs the forward under bf16 autocast; kdtune's own callers leave it off, so every
    accuracy it reports or ranks on comes from fp32 logits.
    """
    return _eval_metrics(evaluation_sums(model, batches, next(model.parameters()).device, amp=amp,
                                         memory_format=memory_format))


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device, *,
                    amp: bool = False, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``[CE sum, top-1 hits, top-5 hits, samples]`` of ``model`` in eval mode over ``batches``
    (float64 on ``device``): sums, so that data-parallel ranks add theirs up."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    correct1 = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros_like(correct1)
    n = 0
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.contiguous(memory_format=memory_format))[0]
        loss += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        c1, c5 = _correct(logits, y)
        correct1 += c1
        correct5 += c5
        n += y.shape[0]
    model.train(was_training)
    return torch.stack([loss.double(), correct1.double(), correct5.double(),
                        torch.tensor(float(n), dtype=torch.float64, device=device)])


def _eval_metrics(sums: Tensor) -> dict[str, float]:
    loss, correct1, correct5, n = sums.tolist()
    return {"loss": loss / n, "acc1": 100.0 * correct1 / n, "acc5": 100.0 * correct5 / n}


def _check_data_parallel(distiller: Distiller) -> None:
    """Methods whose state is per process, refused before any work starts: it would silently
    differ between the ranks of a data-parallel run."""
    name = type(distiller).__name__
    if distiller.needs_indices:
        raise ValueError(f"method {name}: a data-parallel run (workers_per_trial > 1) cannot keep its memory over "
                         f"the training set (each rank would update its own copy); run it with one worker")
    if distiller.strong_view is not None:
        raise ValueError(f"method {name}: its strong view draws per process, which a data-parallel run "
                         f"(workers_per_trial > 1) would not keep in step or resume exactly; run it with one worker")


def _correct(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of top-1 and top-5 hits, as device tensors."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == target[:, None]
    return hits[:, 0].sum(), hits.any(1).sum()
