"""The streaming ``imagenet`` dataset, torchvision's models as teachers and students, and the
FKD-style crop cache, on a fabricated ImageFolder of small JPEGs (tests/imagefolder.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from imagefolder import CLASSES, write_imagefolder
from kdtune import fkd_cache
from kdtune.config import ConfigError, RunConfig
from kdtune.data import DataError, load_dataset
from kdtune.imagenet import FolderImages, crop_box, decode
from kdtune.models import build_model
from kdtune.teachers import CheckpointError, load_checkpoint

RES = 24  # train and eval crop of the tests (ImageNet: 224)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small batches gain nothing from intra-op threads, and on a busy 2-core runner they stall.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("imagenet"))


def load(folder: Path, **options):
    return load_dataset("imagenet", root=folder, val_size=16, options={"resolution": RES, "workers": 0, **options})


@pytest.fixture(scope="module")
def data(folder):
    return load(folder)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A torchvision ResNet-34 state dict, as torchvision publishes its weights (4 classes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet34-test.pth"
    torch.save(torchvision.models.resnet34(num_classes=len(CLASSES)).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_file):
    model = build_model("tv_resnet34", num_classes=len(CLASSES))
    load_checkpoint(model, teacher_file)
    return model.eval()


# --------------------------------------------------------------------------- the dataset


def test_layout_classes_and_splits(data, folder) -> None:
    assert data.classes == CLASSES and data.num_classes == 4 and data.image_shape == (3, RES, RES)
    assert (len(data.train), len(data.val), len(data.test)) == (96 - 16, 16, 24)
    assert data.eval_resize == round(RES * 256 / 224)
    # val/ is the test split; labels are the sorted folders' positions
    assert data.test.labels.tolist() == [c for c in range(4) for _ in range(6)]
    assert data.test.path(0) == str(folder / "val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG")
    # the carved val split is seeded, disjoint from train, and moves back for a final run
    again = load(folder)
    assert np.array_equal(again.val.paths, data.val.paths)
    assert not set(data.val.paths.tolist()) & set(data.train.paths.tolist())
    final = data.for_final()
    assert len(final.train) == 96 and len(final.val) == 0
    assert sorted(final.train.paths.tolist()) == sorted([*data.train.paths.tolist(), *data.val.paths.tolist()])
    assert data.train_digest() != load(folder, resolution=RES).for_final().train_digest()


def test_bad_folders_are_named(tmp_path, folder) -> None:
    with pytest.raises(DataError, match=r"imagenet: .*/train: folder not found; expected ImageFolder layout"):
        load(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "c").mkdir()
    with pytest.raises(DataError, match=r"differ: only in train/: \['b'\]; only in val/: \['c'\]"):
        load(tmp_path)
    (tmp_path / "val" / "c").rmdir()
    (tmp_path / "val" / "b").mkdir()
    with pytest.raises(DataError, match=r"/train: class folders without images .*: a, b"):
        load(tmp_path)
    with pytest.raises(DataError, match=r"dataset_options.resolution: expected an integer >= 8, but got 4"):
        load(folder, resolution=4)
    with pytest.raises(DataError, match=r"dataset_options.eval_resize: expected an integer >= resolution \(24\)"):
        load(folder, eval_resize=20)
    with pytest.raises(DataError, match="needs a data root"):
        load_dataset("imagenet")


def test_an_undecodable_file_is_named(tmp_path) -> None:
    root = write_imagefolder(tmp_path, train=3, val=1)
    bad = root / "train" / CLASSES[2] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = load_dataset("imagenet", root=root, val_size=0, options={"resolution": RES, "workers": 0})
    i = data.train.paths.tolist().index(f"train/{CLASSES[2]}/broken.JPEG".encode())
    with pytest.raises(DataError, match=f"{bad}: cannot be decoded as an image"):
        FolderImages(data.train, RES, 28, 0.08)[(i, 2)]


@pytest.mark.parametrize("size", [(48, 40), (36, 52), (500, 375), (90, 20), (20, 90)])
def test_crop_box_follows_random_resized_crop(size) -> None:
    width, height = size
    for seed in range(50):
        top, left, h, w, flip = box = crop_box(width, height, seed, 0.08)
        assert crop_box(width, height, seed, 0.08) == box  # a function of the seed
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and flip in (0, 1)
        if 0.75 <= width / height <= 4 / 3:  # the drawn crops always fit here
            assert 0.08 * 0.9 <= h * w / (width * height) <= 1.0
            assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25  # rounding moves small crops' ratio a little
    # no crop of at least half the area fits a 400 x 10 strip in the allowed ratios: the fallback,
    # a center crop of the nearest ratio (4/3)
    assert crop_box(400, 10, 0, 0.5)[:4] == (0, (400 - 13) // 2, 10, 13)
    assert crop_box(10, 400, 0, 0.5)[:4] == ((400 - 13) // 2, 0, 13, 10)
    flips = [crop_box(48, 40, seed, 0.08)[4] for seed in range(400)]
    assert 150 < sum(flips) < 250


def test_eval_batches_are_torchvisions_resize_and_center_crop(data) -> None:
    import torchvision.transforms.v2 as T

    batches = data.eval_batches(data.test, batch_size=10, device="cpu")
    assert len(batches) == 3
    x, y = next(iter(batches))
    transform = T.Compose([T.Resize(data.eval_resize, antialias=True), T.CenterCrop(RES)])
    expected = transform(decode(data.test.path(3))).float()
    mean = torch.tensor(data.mean).view(3, 1, 1) * 255
    std = torch.tensor(data.std).view(3, 1, 1) * 255
    torch.testing.assert_close(x[3], (expected - mean) / std)
    assert y.tolist() == data.test.labels[:10].tolist()


def test_loader_batches_do_not_depend_on_workers_and_resume_exactly(folder, data) -> None:
    loader = data.train_loader(batch_size=32, device="cpu", seed=3)
    first = list(loader.batches())
    state = loader.state_dict()
    second = list(loader.batches())
    assert [b[0].shape[0] for b in first] == [32, 32, 16]
    assert sorted(torch.cat([b[2] for b in first]).tolist()) == list(range(80))
    assert all(torch.equal(b[1], data.train.labels[b[2]]) for b in first)
    # the same draws with two decoding processes, and from the saved state
    workers = load(folder, workers=2).train_loader(batch_size=32, device="cpu", seed=3)
    for ours, theirs in zip(first, workers.batches()):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    resumed = data.train_loader(batch_size=32, device="cpu", seed=99)
    resumed.load_state_dict(state)
    for ours, theirs in zip(second, resumed.batches()):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # a subset, as KDAS asks for one
    subset = torch.tensor([5, 7, 11])
    (x, y, idx, views), = loader.batches(subset, batch_size=8)
    assert sorted(idx.tolist()) == [5, 7, 11] and x.shape == (3, 3, RES, RES)


def test_config_refuses_what_a_stream_cannot_do(folder) -> None:
    base = {"dataset": "imagenet", "data_root": str(folder), "teacher": "tv_resnet34", "student": "tv_resnet18"}
    with pytest.raises(ConfigError, match="'on' .*needs a finite set of views, but dataset 'imagenet' draws"):
        RunConfig.from_dict({**base, "teacher_cache": "on"})
    with pytest.raises(ConfigError, match="'crops' is for streaming datasets"):
        RunConfig.from_dict({"dataset": "digits", "teacher_cache": "crops"})
    with pytest.raises(ConfigError, match="'mlkd' trains on a second, strongly augmented view"):
        RunConfig.from_dict({**base, "method": "mlkd"})
    with pytest.raises(ConfigError, match="'crops' needs a method that uses only the teacher's logits"):
        RunConfig.from_dict({**base, "method": "at", "teacher_cache": "crops"})
    with pytest.raises(ConfigError, match="unknown model 'tv_resnet36'.*tv_resnet34"):
        RunConfig.from_dict({**base, "teacher": "tv_resnet36"})
    with pytest.raises(ConfigError, match="teacher_cache_topk"):
        RunConfig.from_dict({**base, "teacher_cache": "crops", "teacher_cache_topk": 0})
    from kdtune.run import load_data

    cfg = RunConfig.from_dict({**base, "teacher_cache": "crops", "teacher_cache_topk": 4,
                               "dataset_options": {"resolution": RES, "workers": 0}, "val_size": 16})
    with pytest.raises(DataError, match=r"teacher_cache_topk: must be below the 4 classes of dataset 'imagenet' "
                                        r".*but got 4"):
        load_data(cfg)


# --------------------------------------------------------------------------- torchvision's models


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_resnet50", "tv_mobilenet_v2"])
def test_logits_are_torchvisions(name) -> None:
    ours = build_model(name, num_classes=7).eval()
    theirs = getattr(torchvision.models, name[3:])(num_classes=7).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # torchvision's keys, nothing added
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = ours(x)
        assert torch.equal(logits, theirs(x))
    assert [f.shape[-1] for f in feats["feats"]] == [16, 8, 4, 2, 1]  # strides 2 to 32


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v2"])
def test_stage_by_stage_equals_forward(name) -> None:
    """What SAKD runs (forward_stage, forward_head) equals forward in train mode: outputs, features
    and BN statistics (test_models.py checks this for the CIFAR zoo)."""
    import copy

    model = build_model(name, num_classes=5).train()
    whole, staged = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)  # MobileNetV2's classifier has dropout: the same mask both ways
        logits, feats = whole(x)
        torch.manual_seed(1)
        y, stages = x, []
        for i in range(staged.num_stages):
            y, preact = staged.forward_stage(i, y)
            stages.append((y, preact))
        s_logits, pooled = staged.forward_head(y)
    assert torch.equal(s_logits, logits) and torch.equal(pooled, feats["pooled_feat"])
    for (f, p), ref_f, ref_p in zip(stages, feats["feats"], feats["preact_feats"]):
        assert torch.equal(f, ref_f) and torch.equal(p, ref_p)
    for key, value in staged.state_dict().items():
        assert torch.equal(value, whole.state_dict()[key]), key


def test_mdistillers_mobilenet_v1() -> None:
    """The seeds' MobileNet-V1 student: mdistiller's keys and MobileNet-V1's parameter count; its
    stages end at strides 2 to 32 with their pre-activations before the last ReLU."""
    model = build_model("MobileNetV1", num_classes=1000).eval()
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    keys = set(model.state_dict())
    assert {"model.0.0.weight", "model.13.4.running_var", "fc.weight"} <= keys
    assert all(k.startswith(("model.", "fc.")) for k in keys)
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000) and [f.shape[-1] for f in feats["feats"]] == [32, 16, 8, 4, 2]
    for f, p in zip(feats["feats"], feats["preact_feats"]):
        assert torch.equal(f, p.relu()) and (p < 0).any()


@pytest.mark.parametrize("method", ["reviewkd", "sakd"])
def test_feature_methods_run_on_the_imagenet_models(method) -> None:
    """Every stage's features (ReviewKD) and stage-by-stage execution (SAKD) of a torchvision teacher
    and the MobileNet-V1 student: one step's losses are finite and train. Of all methods, these two ask
    the most of a model's interface."""
    from kdtune.distillers import build_distiller

    torch.manual_seed(0)
    teacher, student = build_model("tv_resnet18", num_classes=5), build_model("MobileNetV1", num_classes=5)
    distiller = build_distiller(method, student, teacher, input_shape=(3, 32, 32))
    extra = {}
    if distiller.needs_indices:
        distiller.bind_train_set(torch.arange(40) % 5)
        extra["indices"] = torch.arange(4)
    _, losses = distiller(torch.randn(4, 3, 32, 32), torch.arange(4), **extra)
    loss = sum(term.mean() for term in losses.values())
    loss.backward()
    assert torch.isfinite(loss) and len(losses) >= 2
    assert student.model[0][0].weight.grad.abs().sum() > 0


def test_teacher_weights_file_loads_or_is_refused(teacher_file, tmp_path) -> None:
    load_checkpoint(build_model("tv_resnet34", num_classes=4), teacher_file)  # a bare torchvision state dict
    with pytest.raises(CheckpointError, match=r"resnet34-test.pth: weights do not fit TorchvisionResNet: missing "
                                              r"keys: none; unexpected keys: layer1.2.bn1.bias"):
        load_checkpoint(build_model("tv_resnet18", num_classes=4), teacher_file)
    with pytest.raises(CheckpointError, match=r"mis-shaped: fc.bias \(file \(4,\), model \(1000,\)\)"):
        load_checkpoint(build_model("tv_resnet34", num_classes=1000), teacher_file)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(build_model("tv_resnet34"), junk)


# --------------------------------------------------------------------------- the crop cache


def test_top_k_reconstruction_keeps_the_mass_at_t1() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -2.0, 0.5]])
    values, classes, rest = fkd_cache.top_k_rest(logits, 2)
    assert classes.tolist() == [[0, 1]] and values.tolist() == [[3.0, 1.0]]
    assert rest.item() == pytest.approx(math.log((1 + math.exp(-2) + math.exp(0.5)) / 3))
    rebuilt = fkd_cache.reconstruct(values, classes, rest, 5)
    assert rebuilt[0, :2].tolist() == [3.0, 1.0] and torch.allclose(rebuilt[0, 2:], rest.expand(3))
    p, q = logits.softmax(1), rebuilt.softmax(1)
    torch.testing.assert_close(q[0, :2], p[0, :2])  # the top k's probabilities at T = 1
    torch.testing.assert_close(q[0, 2:].sum(), p[0, 2:].sum())  # and the rest's total mass
    # at T = 4 the top-k ratio stays, and the even spread holds more than the teacher's tail
    p4, q4 = (logits / 4).softmax(1), (rebuilt / 4).softmax(1)
    torch.testing.assert_close(q4[0, 0] / q4[0, 1], p4[0, 0] / p4[0, 1])
    assert q4[0, 2:].sum() > p4[0, 2:].sum()


def test_crop_cache_stores_the_teachers_crops(data, teacher, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fkd_cache, "SHARD_IMAGES", 32)  # 80 images: shards of 32, 32 and 16
    args = dict(crops=2, k=2, cache_dir=tmp_path, device=torch.device("cpu"), amp=False)
    cache = fkd_cache.open_crop_cache(teacher, data, **args, log=lambda _: None)
    plan = cache.plan
    assert (plan.num_shards, cache.source, cache.boxes.shape) == (3, "built", (80, 2, 5))
    # a crop's box comes from its (image, crop) seed alone; its logits are the teacher's on that crop
    images = FolderImages(data.train, RES, data.eval_resize, data.min_scale)
    for i, c in [(0, 1), (33, 0), (79, 1)]:
        seed = fkd_cache.crop_seed(i, c, 2)
        image = decode(data.train.path(i))
        assert tuple(cache.boxes[i, c].tolist()) == crop_box(image.shape[2], image.shape[1], seed, data.min_scale)
        pixels, _ = images[(i, 1, *cache.boxes[i, c].tolist())]
        x = (pixels.float() - torch.tensor(data.mean).view(3, 1, 1) * 255) / (torch.tensor(data.std).view(3, 1, 1) * 255)
        with torch.no_grad():
            live = teacher(x[None])[0]
        expected = fkd_cache.reconstruct(*fkd_cache.top_k_rest(live, 2), 4)
        torch.testing.assert_close(cache.lookup(torch.tensor([i]), torch.tensor([c])), expected)
    # shards built apart, in any order (as builders on several GPUs do), are the same files (at the
    # same batch size: another batch composition may change a convolution's last bits)
    files = {s: plan.shard_path(s).read_bytes() for s in range(3)}
    for s in (2, 0):
        plan.shard_path(s).unlink()
        fkd_cache.build_shard(plan, s, teacher, data, device=torch.device("cpu"), amp=False,
                              memory_format=torch.contiguous_format, batch_size=64, log=lambda _: None)
        assert plan.shard_path(s).read_bytes() == files[s]
    # a truncated shard is reported and rebuilt; the others are read
    with open(plan.shard_path(1), "r+b") as f:
        f.truncate(5000)
    said: list[str] = []
    again = fkd_cache.open_crop_cache(teacher, data, **args, log=said.append)
    assert again.source == "built" and any("shard-00001.crops: 5000 bytes" in line for line in said)
    assert plan.shard_path(1).read_bytes() == files[1]
    assert fkd_cache.open_crop_cache(teacher, data, **args, log=said.append).source == "loaded"
    with pytest.raises(fkd_cache.CacheError, match=r"teacher_cache_topk: must be in \[1, 4\)"):
        fkd_cache.open_crop_cache(teacher, data, **{**args, "k": 4})


def test_loader_samples_among_the_stored_crops(data, teacher, tmp_path) -> None:
    cache = fkd_cache.open_crop_cache(teacher, data, crops=3, k=2, cache_dir=tmp_path, device=torch.device("cpu"),
                                      amp=False, log=lambda _: None)
    loader = data.train_loader(batch_size=40, device="cpu", seed=0)
    loader.use_stored_crops(cache)
    images = FolderImages(data.train, RES, data.eval_resize, data.min_scale)
    seen = []
    for x, _, idx, views in loader.batches():
        assert 0 <= views.min() and views.max() < 3
        seen += views.tolist()
        pixels, box = images[(int(idx[0]), 1, *cache.boxes[idx[0], views[0]].tolist())]
        assert torch.equal(box, cache.boxes[idx[0], views[0]])
        assert torch.allclose(loader.to_device(pixels[None])[0], x[0])
    assert set(seen) == {0, 1, 2}


# --------------------------------------------------------------------------- end to end


def test_resnet34_to_resnet18_on_stored_crops_end_to_end(folder, teacher_file, tmp_path, monkeypatch) -> None:
    """kdtune train's run on the fabricated ImageFolder: a torchvision teacher from its weights file,
    the crop cache built on the first epoch, and a resumed run equal to an uninterrupted one."""
    from kdtune.train import run

    monkeypatch.setenv("KDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    values = {"dataset": "imagenet", "data_root": str(folder), "val_size": 16,
              "dataset_options": {"resolution": 16, "workers": 0}, "teacher": "tv_resnet34",
              "teacher_checkpoint": str(teacher_file), "student": "tv_resnet18", "method": "kd",
              "teacher_cache": "crops", "teacher_cache_crops": 2, "teacher_cache_topk": 3, "epochs": 2,
              "batch_size": 32, "schedule": "cosine", "device": "cpu"}
    lines: list[str] = []
    whole = run(RunConfig.from_dict(values), tmp_path / "whole", log=lines.append)
    assert whole["status"] == "completed" and whole["epochs"] == 2
    assert any("crop cache: shard 1/1 (80 images x 2 crops) built" in line for line in lines)
    assert whole["teacher"]["source"] == "checkpoint" and 0 <= whole["val/acc1"] <= 100

    def stop(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(RunConfig.from_dict(values), tmp_path / "part", log=lines.append, on_epoch=stop)
    resumed = run(RunConfig.from_dict(values), tmp_path / "part", resume=True, log=lines.append)
    assert any("teacher_crops/" in line and "loaded)" in line for line in lines)  # built once, then read
    for key in ("train/loss", "train/acc1", "val/acc1", "val/loss"):
        assert resumed[key] == whole[key], key


@pytest.mark.slow
def test_a_search_distils_from_the_crop_cache_its_driver_built(short_searches) -> None:
    """The imagenet search of the short searches (tests/searches.py: imagenet_space): the driver built
    the crop cache once, and the trial read it."""
    import csv

    run = short_searches["imagenet"]  # its exit status is checked where it ran
    assert "crop cache: shard 1/1 (80 images x 2 crops) built" in run.result.stdout
    with open(run.folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["status"] == "completed" and 0 <= float(rows[0]["final_val/acc1"]) <= 100
    (trial_out,) = run.folder.glob("KDTrainable_*/stdout")
    assert "teacher_crops/" in trial_out.read_text() and "loaded)" in trial_out.read_text()


def test_the_loader_benchmark_prints_the_loaders_and_the_steps_rates(tmp_path, monkeypatch, capsys) -> None:
    """``kdtune bench --loader`` end to end, on its own temporary JPEGs (only --help was run once,
    and an ImportError in its model check went unseen); the command in this process (test_cli
    runs it in its own)."""
    import re

    from commands import run_here

    r = run_here("bench", "--loader", "--images", "16", "--resolution", "16", "--batch-size", "8", "--workers", "0,1",
                 "--steps", "1", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train = re.findall(r"train loader,\s+(\d) workers:\s+([\d.]+) img/s \((\d+) images\)", r.stdout)
    assert [(w, n) for w, _, n in train] == [("0", "16"), ("1", "16")] and all(float(rate) > 0 for _, rate, _ in train)
    assert re.search(r"eval loader,\s+1 workers:\s+[\d.]+ img/s \(16 images\)", r.stdout), r.stdout
    assert re.search(r"step tv_resnet34 -> tv_resnet18 \(kd, teacher live\):\s+[\d.]+ img/s \(1 steps", r.stdout), r.stdout
    assert not any(tmp_path.iterdir())  # its JPEGs were in a temporary folder, removed
