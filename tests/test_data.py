"""Tests for the dataset loaders, the seeded batch streams with augmentation, and evaluation."""

from __future__ import annotations

import os
import pickle
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import ormo_ps.common.data as data
from ormo_ps.common.data import (
    DATASETS,
    BatchStream,
    Dataset,
    augment_batch,
    iterations_per_epoch,
    load_dataset,
    make_synthetic,
)
from ormo_ps.common.evaluation import bn_calibration_batches, eval_batches, evaluate

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ORMO_PS_CACHE", str(cache))
    return cache


def _tiny_image_dataset(n: int = 6, size: int = 4, augment: bool = True) -> Dataset:
    """Images whose every pixel is distinct, labelled by their own index, so a batch row can be traced back."""
    x = torch.arange(n * 3 * size * size, dtype=torch.int64).remainder(251).add(1).to(torch.uint8)
    x = x.view(n, 3, size, size)
    return Dataset(
        name="tiny",
        train_x=x,
        train_y=torch.arange(n),
        test_x=x[:2].clone(),
        test_y=torch.arange(2),
        num_classes=n,
        input_shape=(3, size, size),
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        augment=augment,
    )


# --------------------------------------------------------------------------------------- digits / synthetic


def test_digits_shapes_and_fixed_split() -> None:
    digits = load_dataset("digits")
    assert digits.train_x.shape == (1500, 1, 8, 8)
    assert digits.test_x.shape == (297, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert float(digits.train_x.min()) == 0.0 and float(digits.train_x.max()) == 1.0
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert not digits.augment
    # All ten classes on both sides, and the split is the same on every load.
    assert set(digits.train_y.tolist()) == set(range(10)) == set(digits.test_y.tolist())
    again = load_dataset("digits")
    assert torch.equal(digits.train_x, again.train_x) and torch.equal(digits.test_y, again.test_y)
    # The split is a permutation of sklearn's 1797 images: the label counts add up.
    from sklearn.datasets import load_digits

    expected = np.bincount(load_digits().target, minlength=10)
    counts = torch.bincount(torch.cat([digits.train_y, digits.test_y]), minlength=10).numpy()
    assert np.array_equal(counts, expected)


def test_digits_normalised_train_set_is_centred() -> None:
    digits = load_dataset("digits")
    x = digits.normalize(digits.train_x)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3


def test_synthetic_is_deterministic_sized_and_learnable() -> None:
    a = load_dataset("synthetic", synthetic_size=400)
    b = load_dataset("synthetic", synthetic_size=400)
    assert a.train_x.shape == (400, 3, 8, 8) and a.test_x.shape == (100, 3, 8, 8)
    assert a.num_classes == 10
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    # Learnable: a nearest-class-mean rule fitted on the train split classifies the test split well.
    means = torch.stack([a.train_x[a.train_y == c].mean(0) for c in range(a.num_classes)]).flatten(1)
    distances = torch.cdist(a.test_x.flatten(1), means)
    accuracy = float((distances.argmin(1) == a.test_y).float().mean())
    assert accuracy > 0.9


def test_synthetic_flat_features() -> None:
    flat = make_synthetic(train_size=50, test_size=10, input_shape=(12,))
    assert flat.train_x.shape == (50, 12) and flat.input_shape == (12,)
    x, y = next(BatchStream(flat, 5, seed=0))
    assert x.shape == (5, 12) and y.shape == (5,)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=", ".join(sorted(DATASETS))):
        load_dataset("mnist")


def test_dataset_validation_names_the_field() -> None:
    tiny = _tiny_image_dataset()
    with pytest.raises(ValueError, match="mean"):
        Dataset(**{**tiny.__dict__, "mean": (0.5, 0.5)})
    with pytest.raises(ValueError, match="train_y"):
        Dataset(**{**tiny.__dict__, "train_y": tiny.train_y.to(torch.int32)})
    with pytest.raises(ValueError, match="std"):
        Dataset(**{**tiny.__dict__, "std": (0.0, 1.0, 1.0)})


# ---------------------------------------------------------------------------------------------- BatchStream


def _take(stream: BatchStream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(n)]


def test_batch_stream_same_seed_is_bit_identical_and_seeds_differ() -> None:
    dataset = _tiny_image_dataset(n=10, size=8)
    a = _take(BatchStream(dataset, 3, seed=7), 12)  # four passes, with augmentation
    b = _take(BatchStream(dataset, 3, seed=7), 12)
    c = _take(BatchStream(dataset, 3, seed=8), 12)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_batch_stream_passes_are_fresh_permutations_without_the_last_partial_batch() -> None:
    dataset = make_synthetic(train_size=10, test_size=2)
    stream = BatchStream(dataset, 3, seed=0)
    assert stream.iterations_per_epoch == 3 == iterations_per_epoch(dataset, 3)
    assert stream.samples_per_epoch == 10
    orders = []
    for _ in range(4):
        rows = torch.cat([x for x, _ in _take(stream, 3)])
        # Trace rows back to train indices (synthetic samples are distinct).
        normalised = dataset.normalize(dataset.train_x)
        index = [int(torch.nonzero((normalised == row).flatten(1).all(1))[0]) for row in rows]
        assert len(set(index)) == 9  # without replacement within a pass; one sample left over
        orders.append(index)
    assert stream.passes_completed == 3
    assert len({tuple(o) for o in orders}) == 4


def test_batch_stream_without_augmentation_returns_normalised_samples() -> None:
    digits = load_dataset("digits")
    x, y = next(BatchStream(digits, 16, seed=1))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    normalised = digits.normalize(digits.train_x)
    for row, label in zip(x, y):
        match = torch.nonzero((normalised == row).flatten(1).all(1)).flatten()
        assert len(match) >= 1 and int(digits.train_y[match[0]]) == int(label)


def _augmented_candidates(image: torch.Tensor) -> list[torch.Tensor]:
    """Every crop of the zero-padded image at every offset, unflipped and flipped."""
    _, height, width = image.shape
    padded = F.pad(image, (4, 4, 4, 4))
    crops = [padded[:, r : r + height, c : c + width] for r in range(9) for c in range(9)]
    return crops + [torch.flip(crop, dims=(2,)) for crop in crops]


def test_augmentation_only_crops_padded_images_and_flips() -> None:
    # 8x8 images with distinct pixels: every crop keeps some pixels, so flipped and unflipped never coincide.
    dataset = _tiny_image_dataset(n=6, size=8)
    stream = BatchStream(dataset, 6, seed=3)
    seen_flips = 0
    for _ in range(5):
        x, y = next(stream)
        assert x.shape == (6, 3, 8, 8)
        for row, label in zip(x, y):
            image = dataset.train_x[int(label)]
            candidates = [dataset.normalize(c[None])[0] for c in _augmented_candidates(image)]
            matches = [i for i, c in enumerate(candidates) if torch.equal(c, row)]
            assert len(matches) == 1, "an augmented sample is not exactly one crop/flip of its source image"
            seen_flips += matches[0] >= 81
    assert 0 < seen_flips < 30  # flips happen, but not always


def test_augment_batch_offsets_and_flip() -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 32, 32)
    centre = torch.tensor([[4, 4], [4, 4]])
    assert torch.equal(augment_batch(x, centre, torch.tensor([False, False])), x)
    flipped = augment_batch(x, centre, torch.tensor([True, False]))
    assert torch.equal(flipped[0], torch.flip(x[0], dims=(2,))) and torch.equal(flipped[1], x[1])
    corner = augment_batch(x, torch.tensor([[0, 8], [8, 0]]), torch.tensor([False, False]))
    # Offset (0, 8): the image moves down 4 rows and left 4 columns; uncovered pixels are zero (black).
    assert torch.equal(corner[0, :, 4:, :28], x[0, :, :28, 4:])
    assert torch.all(corner[0, :, :4, :] == 0) and torch.all(corner[0, :, :, 28:] == 0)
    assert torch.equal(corner[1, :, :28, 4:], x[1, :, 4:, :28])


def test_batch_stream_rejects_bad_batch_size() -> None:
    dataset = make_synthetic(train_size=10, test_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(dataset, 11, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(dataset, 0, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_stream_on_cuda_matches_cpu() -> None:
    dataset = _tiny_image_dataset(n=10, size=8)
    cpu = _take(BatchStream(dataset, 4, seed=5), 5)
    cuda = _take(BatchStream(dataset.to("cuda"), 4, seed=5, device="cuda"), 5)
    for (xc, yc), (xg, yg) in zip(cpu, cuda):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


def test_normalize_does_not_modify_float_data_in_place() -> None:
    digits = load_dataset("digits")
    before = digits.train_x.clone()
    _take(BatchStream(digits, 100, seed=0), 3)
    list(eval_batches(digits, "train", 500))
    assert torch.equal(digits.train_x, before)


# ------------------------------------------------------------------------------------ evaluation utilities


def test_eval_batches_cover_the_split_in_order() -> None:
    digits = load_dataset("digits")
    batches = list(eval_batches(digits, "test", batch_size=100))
    assert [len(y) for _, y in batches] == [100, 100, 97]
    assert torch.equal(torch.cat([y for _, y in batches]), digits.test_y)
    assert torch.allclose(torch.cat([x for x, _ in batches]), digits.normalize(digits.test_x))
    with pytest.raises(ValueError, match="split"):
        list(eval_batches(digits, "validation", 10))


def test_bn_calibration_batches_are_seeded_unaugmented_train_samples() -> None:
    dataset = _tiny_image_dataset(n=6, size=4)
    batches = bn_calibration_batches(dataset, n_batches=4, batch_size=4, seed=0)  # 16 > 6: several passes
    assert len(batches) == 4 and all(b.shape == (4, 3, 4, 4) for b in batches)
    normalised = dataset.normalize(dataset.train_x)
    for row in torch.cat(batches):
        assert bool((normalised == row).flatten(1).all(1).any())
    again = bn_calibration_batches(dataset, n_batches=4, batch_size=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


class _AlwaysClassZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 10)


def test_evaluate_reports_accuracy_and_mean_loss_and_restores_mode() -> None:
    digits = load_dataset("digits")
    model = _AlwaysClassZero().train()
    result = evaluate(model, digits, batch_size=128)
    # Equal logits: argmax picks class 0, and the cross-entropy is log(10) for every sample.
    assert result["test_accuracy"] == pytest.approx(float((digits.test_y == 0).float().mean()))
    assert result["test_loss"] == pytest.approx(float(np.log(10)))
    assert model.training


# ------------------------------------------------------------------------------------------ CIFAR loaders


def _write_pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _fake_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_fake_cifar10_python(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for i in range(1, 6):
        x = _fake_images(per_batch, seed=i)
        y = [(i + j) % 10 for j in range(per_batch)]
        _write_pickle(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y})
        images.append(x)
        labels.extend(y)
    _write_pickle(folder / "test_batch", {b"data": _fake_images(3, seed=9), b"labels": [9, 0, 1]})
    _write_pickle(folder / "batches.meta", {b"label_names": [str(c).encode() for c in range(10)]})
    return np.concatenate(images), np.array(labels)


def test_cifar10_python_layout(tmp_path: Path) -> None:
    images, labels = _write_fake_cifar10_python(tmp_path)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        cifar = load_dataset("cifar10", str(data_dir))
        assert cifar.train_x.shape == (20, 3, 32, 32) and cifar.train_x.dtype == torch.uint8
        assert cifar.test_x.shape == (3, 3, 32, 32)
        assert np.array_equal(cifar.train_x.numpy().reshape(20, 3072), images)
        assert cifar.train_y.tolist() == labels.tolist() and cifar.test_y.tolist() == [9, 0, 1]
        assert cifar.num_classes == 10 and cifar.augment
        assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2470, 0.2435, 0.2616)


def test_cifar10_python_layout_is_cached_and_a_changed_file_is_read_again(tmp_path: Path, _private_cache: Path) -> None:
    images, _ = _write_fake_cifar10_python(tmp_path)
    first = load_dataset("cifar10", str(tmp_path))
    entries = list(_private_cache.glob("cifar10-batches-*"))
    assert len(entries) == 1 and str(entries[0] / "train_x.npy") in Path("/proc/self/maps").read_text()
    changed = _fake_images(4, seed=99)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _write_pickle(batch, {b"data": changed, b"labels": [1, 2, 3, 4]})
    os.utime(batch, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = load_dataset("cifar10", str(tmp_path))
    assert np.array_equal(first.train_x.numpy().reshape(20, 3072)[:4], images[:4])
    assert np.array_equal(second.train_x.numpy().reshape(20, 3072)[:4], changed)
    assert second.train_y.tolist()[:4] == [1, 2, 3, 4]


def test_cifar100_python_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _fake_images(5, seed=1)
    _write_pickle(folder / "train", {b"data": train, b"fine_labels": [0, 42, 99, 7, 7], b"coarse_labels": [0] * 5})
    test = _fake_images(2, seed=2)
    _write_pickle(folder / "test", {b"data": test, b"fine_labels": [99, 1], b"coarse_labels": [0, 0]})
    _write_pickle(folder / "meta", {b"fine_label_names": [b"c"] * 100})
    cifar = load_dataset("cifar100", str(tmp_path))
    assert cifar.num_classes == 100
    assert cifar.train_y.tolist() == [0, 42, 99, 7, 7] and cifar.test_y.tolist() == [99, 1]
    assert np.array_equal(cifar.train_x.numpy().reshape(5, 3072), train)
    assert cifar.mean == (0.5071, 0.4865, 0.4409) and cifar.std == (0.2673, 0.2564, 0.2762)


def test_cifar_python_layout_with_wrong_labels_is_rejected(tmp_path: Path) -> None:
    _write_fake_cifar10_python(tmp_path)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _fake_images(1, 0), b"labels": [10]})
    with pytest.raises(ValueError, match="labels"):
        load_dataset("cifar10", str(tmp_path))


def _write_image_folder(root: Path, classes: list[str], per_class: dict[str, int]) -> dict[str, np.ndarray]:
    """PNG (lossless) tree; returns the expected CHW uint8 images per split in loader order."""
    rng = np.random.default_rng(0)
    expected: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, count in per_class.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                if i == 0 and cls == classes[1]:
                    # A grayscale file must come out as RGB with three equal channels.
                    gray = pixels[:, :, 0]
                    Image.fromarray(gray, mode="L").save(folder / f"{i:04d}.png")
                    pixels = np.stack([gray] * 3, axis=2)
                else:
                    Image.fromarray(pixels).save(folder / f"{i:04d}.png")
                expected[split].append(pixels.transpose(2, 0, 1))
            (folder / "notes.txt").write_text("not an image")
    return {split: np.stack(images) for split, images in expected.items()}


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_image_folder_layout_is_decoded_and_cached(
    tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    expected = _write_image_folder(root, CIFAR10_CLASSES, {"train": 3, "test": 1})
    cifar = load_dataset("cifar10", str(root))
    assert cifar.train_x.shape == (30, 3, 32, 32) and cifar.test_x.shape == (10, 3, 32, 32)
    assert np.array_equal(cifar.train_x.numpy(), expected["train"])
    assert np.array_equal(cifar.test_x.numpy(), expected["test"])
    assert cifar.train_y.tolist() == [c for c in range(10) for _ in range(3)]
    assert cifar.test_y.tolist() == list(range(10))
    assert cifar.classes == tuple(CIFAR10_CLASSES)
    cache_entries = list(_private_cache.glob("cifar10-imagefolder-*"))
    assert len(cache_entries) == 1 and cache_entries[0].is_dir()
    assert not list(_private_cache.glob("*.tmp"))
    # The loaded images are the cache file itself, mapped (shared between processes), not a private copy.
    assert str(cache_entries[0] / "train_x.npy") in Path("/proc/self/maps").read_text()

    def no_decoding(path: str) -> np.ndarray:
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(data, "_decode_image", no_decoding)
    cached = load_dataset("cifar10", str(root))
    assert torch.equal(cached.train_x, cifar.train_x) and torch.equal(cached.test_y, cifar.test_y)

    # A changed file changes the key: the stale cache is not used.
    changed = root / "train" / "bird" / "0000.png"
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset("cifar10", str(root))


def test_image_folder_with_wrong_class_count_or_size_is_rejected(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "ten", CIFAR10_CLASSES, {"train": 1, "test": 1})
    with pytest.raises(ValueError, match="100 class folders"):
        load_dataset("cifar100", str(tmp_path / "ten"))

    _write_image_folder(tmp_path / "big", CIFAR10_CLASSES, {"train": 1, "test": 1})
    Image.new("RGB", (64, 64)).save(tmp_path / "big" / "train" / "cat" / "9999.png")
    with pytest.raises(ValueError, match="32x32"):
        load_dataset("cifar10", str(tmp_path / "big"))


@pytest.mark.parametrize("make", ["missing", "empty", "only-train"])
def test_missing_or_malformed_dir_names_both_layouts_and_download(tmp_path: Path, make: str) -> None:
    data_dir = tmp_path / "cifar"
    if make != "missing":
        data_dir.mkdir()
    if make == "only-train":
        (data_dir / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", str(data_dir))
    message = str(info.value)
    assert "cifar-10-batches-py" in message
    assert "train/<class>" in message and "test/<class>" in message
    assert "--download" in message


def test_download_fetches_the_python_layout_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(name: str, data_dir: Path) -> None:
        calls.append(name)
        _write_fake_cifar10_python(data_dir)

    monkeypatch.setattr(data, "_download_cifar", fake_download)
    cifar = load_dataset("cifar10", str(tmp_path), download=True)
    assert calls == ["cifar10"] and cifar.train_x.shape == (20, 3, 32, 32)
    load_dataset("cifar10", str(tmp_path), download=True)
    assert calls == ["cifar10"]  # present now: no second download


# --------------------------------------------------------------------------------- the real CIFAR-10 images


@pytest.fixture(scope="module")
def cifar10_jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"{CIFAR10_ARCHIVE} is absent: the CIFAR-10 JPEG archive lives in ../shared/data")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(CIFAR10_ARCHIVE, "r:gz") as archive:
        archive.extractall(root, filter="data")
    yield root


@pytest.mark.data
@pytest.mark.slow
def test_real_cifar10_images(cifar10_jpeg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cifar = load_dataset("cifar10", str(cifar10_jpeg_dir))
    assert cifar.train_x.shape == (50_000, 3, 32, 32) and cifar.test_x.shape == (10_000, 3, 32, 32)
    assert cifar.num_classes == 10 and cifar.classes == tuple(CIFAR10_CLASSES)
    assert torch.bincount(cifar.train_y).tolist() == [5000] * 10
    assert torch.bincount(cifar.test_y).tolist() == [1000] * 10
    # The standard CIFAR-10 statistics fit the JPEG re-encoding too.
    x = cifar.normalize(cifar.train_x[::10])
    assert torch.all(x.mean(dim=(0, 2, 3)).abs() < 0.02)
    assert torch.all((x.std(dim=(0, 2, 3)) - 1).abs() < 0.03)

    monkeypatch.setattr(data, "_decode_image", lambda path: pytest.fail("second load decoded again"))
    cached = load_dataset("cifar10", str(cifar10_jpeg_dir))
    assert torch.equal(cached.test_x, cifar.test_x)


def test_split_validation_holds_out_the_same_samples_for_every_run_and_evaluation_reports_both() -> None:
    digits = load_dataset("digits")
    split = data.split_validation(digits, 300)
    assert split.num_train == digits.num_train - 300 and len(split.val_x) == 300
    assert split.splits == ("train", "val", "test") and split.eval_splits == ("val", "test")
    # Every training sample lands in exactly one of the two parts; the same seed picks the same ones.
    together = torch.cat([split.train_x, split.val_x]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, digits.train_x.flatten(1).tolist()))
    assert torch.equal(data.split_validation(digits, 300).val_x, split.val_x)
    assert not torch.equal(data.split_validation(digits, 300, seed=1).val_x, split.val_x)
    assert torch.equal(split.test_x, digits.test_x)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    result = evaluate(model, split)
    assert set(result) == {"val_accuracy", "val_loss", "test_accuracy", "test_loss"}
    assert result["test_accuracy"] == evaluate(model, digits)["test_accuracy"]
    logits = model(split.normalize(split.val_x))
    assert result["val_accuracy"] == pytest.approx(float((logits.argmax(1) == split.val_y).float().mean()))

    with pytest.raises(ValueError, match="validation size"):
        data.split_validation(digits, digits.num_train)
    with pytest.raises(ValueError, match="already has"):
        data.split_validation(split, 10)
