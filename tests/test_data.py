from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdtune.data import DataError, TrainLoader, eval_batches, load_dataset
from tests.conftest import write_cifar


def test_digits_splits_are_disjoint_seeded_and_complete() -> None:
    data = load_dataset("digits")
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert len(data.val) == 300
    again = load_dataset("digits")
    assert torch.equal(again.val.images, data.val.images)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.val.labels, data.val.labels)
    assert torch.equal(other.test.images, data.test.images)  # test split never moves
    final = data.for_final()
    assert len(final.train) == len(data.train) + len(data.val) and len(final.val) == 0


def test_digits_read_without_scikit_learn_equal_load_digits() -> None:
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from kdtune.data import digits

    bunch = load_digits()
    raw = digits()
    images = torch.cat([raw.train.images, raw.test.images]).flatten(1)
    labels = torch.cat([raw.train.labels, raw.test.labels])
    expected = torch.as_tensor(bunch.data * (255.0 / 16.0)).round().to(torch.uint8)
    order = labels.argsort(stable=True)  # the splits reorder the images: compare as multisets per class
    ref_order = torch.as_tensor(bunch.target).argsort(stable=True)
    assert torch.equal(labels[order], torch.as_tensor(bunch.target)[ref_order])
    assert sorted(map(tuple, images.tolist())) == sorted(map(tuple, expected.tolist()))
    # and a process that loads digits never imports scikit-learn (1.5 s of CPU per trial)
    code = "import sys\nfrom kdtune.data import digits\ndigits()\nprint('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_synthetic_any_shape() -> None:
    data = load_dataset("synthetic", options=dict(num_classes=7, image_size=12, channels=2,
                                                  train_size=50, test_size=10), val_size=5)
    assert data.image_shape == (2, 12, 12)
    assert len(data.train) == 45 and len(data.test) == 10
    assert int(data.train.labels.max()) < 7


@pytest.mark.parametrize("kind,classes", [("cifar100", 100), ("cifar10", 10)])
def test_cifar_reads_torchvision_format(tmp_path: Path, kind: str, classes: int) -> None:
    write_cifar(tmp_path, kind)
    data = load_dataset(kind, root=tmp_path, val_size=10)
    assert data.num_classes == classes
    assert data.image_shape == (3, 32, 32)
    assert len(data.train) == 50 and len(data.val) == 10 and len(data.test) == 20
    assert data.crop_padding == 4 and data.flip


def test_cifar_missing_files_error_names_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path.resolve()) in msg
    assert "cifar-100-python/train" in msg and "cifar-100-python/test" in msg
    assert "--download" in msg


def test_cifar_corrupt_file(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cifar-100-python/test"):
        load_dataset("cifar100", root=tmp_path)


def _all_views(image: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Every crop (and mirror) RandomCrop(padding=pad) + RandomHorizontalFlip can produce."""
    c, h, w = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))
    views = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    if flip:
        views += [v.flip(2) for v in views]
    return torch.stack(views)


@pytest.mark.parametrize("channels_last", [False, True])
def test_augmentation_only_produces_the_162_views(channels_last: bool) -> None:
    data = load_dataset("synthetic", val_size=0, options=dict(train_size=4, test_size=1))
    loader = TrainLoader(data, batch_size=4, device="cpu", seed=0, channels_last=channels_last)
    shift = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
    scale = torch.tensor(data.std).view(1, -1, 1, 1) * 255
    views = [_all_views(img, 4, True).float() for img in data.train.images]
    assert views[0].shape[0] == 162
    hits: list[set[int]] = [set() for _ in views]
    for _ in range(300):
        for x, y, idx, _ in loader.batches():
            raw = (x * scale + shift).round()  # undo the normalisation
            for img, i in zip(raw, idx.tolist()):
                match = ((views[i] - img).abs().amax(dim=(1, 2, 3)) < 1e-3).nonzero()
                assert len(match) >= 1, "augmentation produced a view outside the 162"
                hits[i].add(int(match[0]))
            assert torch.equal(y, data.train.labels[idx])
    # 1200 draws over 162 views: most views must have appeared (a crop-only or flip-only bug would not)
    assert all(len(h) > 120 for h in hits)


def test_batches_cover_the_epoch_and_indices_subset() -> None:
    data = load_dataset("digits")
    loader = TrainLoader(data, batch_size=64, device="cpu", seed=0)
    seen = torch.cat([idx for _, _, idx, _ in loader.batches()])
    assert torch.equal(seen.sort().values, torch.arange(len(data.train)))
    subset = torch.tensor([5, 9, 100, 7])
    got = torch.cat([idx for _, _, idx, _ in loader.batches(subset, batch_size=3)])
    assert sorted(got.tolist()) == [5, 7, 9, 100]


def test_loader_state_round_trip_replays_batches() -> None:
    data = load_dataset("digits")
    loader = TrainLoader(data, batch_size=32, device="cpu", seed=3)
    state = loader.state_dict()
    first = [x for x, *_ in loader.batches()]
    loader.load_state_dict(state)
    second = [x for x, *_ in loader.batches()]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_eval_batches_are_normalised_unaugmented() -> None:
    data = load_dataset("digits")
    batches = eval_batches(data.val, data, batch_size=128, device="cpu")
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (300, 1, 8, 8)
    expected = (data.val.images.float() / 255 - data.mean[0]) / data.std[0]
    assert torch.allclose(x, expected, atol=1e-5)
