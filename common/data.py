"""In-memory datasets (CIFAR-10/100, digits, synthetic) and seeded mini-batch streams with batch augmentation.

Images are decoded once and kept as uint8 NCHW tensors; a stream normalises and augments a whole mini-batch
with tensor ops, because per-sample PIL transforms are too slow for simulating many workers on two cores.

Normalisation: uint8 data is scaled to [0, 1] first, float32 data is used as is; then `(x - mean) / std` per
channel. Augmentation (only when `Dataset.augment`) is the standard CIFAR recipe: zero-pad 4 pixels on each
side of the *uint8* image (black, as torchvision's `RandomCrop(32, padding=4)` before `Normalize`), take a
random crop of the original size, flip horizontally with probability 1/2.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ormo_ps.common.registry import call_imported, is_import_path, resolve

logger = logging.getLogger(__name__)

PAD = 4
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CACHE_FORMAT_VERSION = 2


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory: train/test tensors plus what is needed to normalise and augment them."""

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    classes: tuple[str, ...] = ()
    # A validation split held out from the training set (`split_validation`), for choosing hyperparameters
    # without looking at the test set; None when there is none.
    val_x: torch.Tensor | None = field(default=None, repr=False)
    val_y: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if (self.val_x is None) != (self.val_y is None):
            raise ValueError("val_x and val_y must be given together")
        for split in self.splits:
            x: torch.Tensor = getattr(self, f"{split}_x")
            y: torch.Tensor = getattr(self, f"{split}_y")
            if x.dtype not in (torch.uint8, torch.float32):
                raise ValueError(f"{split}_x must be uint8 or float32, got {x.dtype}")
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(f"{split}_x must have shape (N, *{self.input_shape}), got {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise ValueError(f"{split}_y must be int64 of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{split}_y must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")
        if len(self.train_x) == 0:
            raise ValueError("train_x must not be empty")
        channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in {channels, 1}:
                raise ValueError(f"{name} must have {channels} entries (one per channel), got {len(value)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.augment and len(self.input_shape) != 3:
            raise ValueError(f"augment needs image data (C, H, W), got input_shape {self.input_shape}")

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    @property
    def num_test(self) -> int:
        return len(self.test_x)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits present: train, test and, when held out, val."""
        return ("train", "test") if self.val_x is None else ("train", "val", "test")

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The splits an evaluation reports: test, and val first when there is one."""
        return tuple(s for s in self.splits if s != "train")

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with its tensors on `device`; share it between streams to copy the data only once."""
        return replace(self, **{f"{s}_{xy}": getattr(self, f"{s}_{xy}").to(device) for s in self.splits for xy in "xy"})

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw samples (uint8 or float32, on any device) to normalised float32 model inputs."""
        scale, shift = _affine_normalisation(
            self.mean, self.std, x.dtype == torch.uint8, len(self.input_shape) == 3, x.device
        )
        # copy=True: float32 input would otherwise be returned as is and modified in place below.
        return x.to(torch.float32, copy=True).mul_(scale).add_(shift)


@functools.lru_cache(maxsize=64)
def _affine_normalisation(
    mean: tuple[float, ...], std: tuple[float, ...], from_uint8: bool, image: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # One multiply-add instead of divide/subtract/divide: x * scale + shift == (x / 255 - mean) / std. Cached,
    # so a CUDA stream does not copy two tiny tensors to the device for every batch.
    shape = (1, -1, 1, 1) if image else (1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(shape)
    std_t = torch.tensor(std, dtype=torch.float64).view(shape)
    scale = 1.0 / (255.0 * std_t) if from_uint8 else 1.0 / std_t
    shift = -mean_t / std_t
    return scale.to(device, torch.float32), shift.to(device, torch.float32)


def split_validation(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
    """The data set with `size` random training samples (drawn by `seed`, the same for every run) moved to a
    validation split: runs train on the rest, and evaluations report validation and test metrics."""
    if dataset.val_x is not None:
        raise ValueError(f"{dataset.name} already has a validation split")
    if not 0 < size < dataset.num_train:
        raise ValueError(f"validation size must be in 1..{dataset.num_train - 1}, got {size}")
    order = torch.randperm(dataset.num_train, generator=torch.Generator().manual_seed(seed))
    # Sorted, so the remaining training samples keep their relative order.
    val, train = order[:size].sort().values, order[size:].sort().values
    return replace(dataset, train_x=dataset.train_x[train], train_y=dataset.train_y[train],
                   val_x=dataset.train_x[val], val_y=dataset.train_y[val])


def iterations_per_epoch(dataset: Dataset, batch_size: int) -> int:
    """Full mini-batches in one pass over the train set (the incomplete last batch is dropped)."""
    return dataset.num_train // batch_size


# ------------------------------------------------------------------------------------------------- streams


def augment_batch(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Zero-pad by `pad`, crop at per-sample (row, col) `offsets` to the original size, flip where `flips`.

    `offsets` is an int64 (B, 2) tensor with values in [0, 2 * pad]; `flips` a bool (B,) tensor. One gather
    over the flattened padded images does the whole batch (about 30x faster than advanced indexing with
    four index tensors, and no Python work per sample).
    """
    batch, channels, height, width = x.shape
    padded_width = width + 2 * pad
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(batch, channels, -1)
    device = x.device
    offsets = offsets.to(device)
    flips = flips.to(device)
    rows = offsets[:, 0:1] + torch.arange(height, device=device)
    cols_forward = torch.arange(width, device=device)
    cols = offsets[:, 1:2] + torch.where(flips[:, None], cols_forward.flip(0), cols_forward)
    source = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(batch, 1, -1)
    return padded.gather(2, source.expand(batch, channels, -1)).reshape(batch, channels, height, width)


class BatchStream:
    """Endless seeded stream of (normalised x, int64 y) training mini-batches for one worker.

    Each pass over the train set uses a fresh permutation, and crops/flips are drawn from the stream's own
    `torch.Generator` (on the CPU, so a stream gives bit-identical batches on every device). The
    incomplete last batch of a pass is dropped.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > dataset.num_train:
            raise ValueError(f"batch_size must be <= the train set size {dataset.num_train}, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._x = dataset.train_x.to(self.device)
        self._y = dataset.train_y.to(self.device)
        self.passes_completed = 0
        self.batches_yielded = 0
        self._order = torch.empty(0, dtype=torch.int64)
        self._position = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.num_train

    @property
    def iterations_per_epoch(self) -> int:
        return iterations_per_epoch(self.dataset, self.batch_size)

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict:
        """Where the stream is: continuing from a loaded state gives the batches it would have given."""
        return {"generator": self.generator.get_state(), "order": self._order.clone(), "position": self._position,
                "passes_completed": self.passes_completed, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"].clone()
        self._position = int(state["position"])
        self.passes_completed = int(state["passes_completed"])
        self.batches_yielded = int(state["batches_yielded"])

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take(self.draw())

    def draw(self) -> Draw:
        """The next mini-batch's sample indexes and crops/flips (CPU tensors from the stream's generator),
        without touching the data: `next(stream)` is `stream.take(stream.draw())`."""
        if self._position + self.batch_size > len(self._order):
            if len(self._order):
                self.passes_completed += 1
            self._order = torch.randperm(self.dataset.num_train, generator=self.generator)
            self._position = 0
        index = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        self.batches_yielded += 1
        if not self.dataset.augment:
            return Draw(index)
        offsets = torch.randint(0, 2 * PAD + 1, (self.batch_size, 2), generator=self.generator)
        flips = torch.randint(0, 2, (self.batch_size,), generator=self.generator).bool()
        return Draw(index, offsets, flips)

    def take(self, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """The (normalised x, y) batch of a draw, on the stream's device. A `Draw.cat` of several streams'
        draws over the same data gives their batches one after the other, each bit for bit as alone."""
        index = draw.index.to(self.device)
        x = self._x.index_select(0, index)
        if draw.offsets is not None:
            x = augment_batch(x, draw.offsets, draw.flips)
        return self.dataset.normalize(x), self._y.index_select(0, index)


class Draw(NamedTuple):
    """What a stream draws for a mini-batch: sample indexes and, with augmentation, per-sample crop offsets
    and flips (see `augment_batch`)."""

    index: torch.Tensor
    offsets: torch.Tensor | None = None
    flips: torch.Tensor | None = None

    @staticmethod
    def cat(draws: Sequence[Draw]) -> Draw:
        """Several draws as one, to take their batches with one gather (and one copy to the device)."""
        if draws[0].offsets is None:
            return Draw(torch.cat([d.index for d in draws]))
        return Draw(*(torch.cat(parts) for parts in zip(*draws, strict=True)))


# ------------------------------------------------------------------------------------------------- loaders

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_PYTHON = {
    # name: (folder, train files, test file, label key, number of classes)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ("train",), "test", b"fine_labels", 100),
}


def cache_dir() -> Path:
    """Where decoded image-folder datasets are cached: `$ORMO_PS_CACHE`, else `~/.cache/ormo-ps`."""
    return Path(os.environ.get("ORMO_PS_CACHE") or Path.home() / ".cache" / "ormo-ps")


def _layout_help(name: str, data_dir: Path) -> str:
    folder, train_files, test_file, _, num_classes = _CIFAR_PYTHON[name]
    return (
        f"expected one of two layouts in {data_dir}: (a) the original python version as torchvision downloads "
        f"it, {data_dir}/{folder}/ with {', '.join(train_files)} and {test_file}; or (b) an image folder, "
        f"{data_dir}/train/<class>/*.jpg|*.jpeg|*.png and {data_dir}/test/<class>/*, with {num_classes} class "
        f"folders of 32x32 images. Pass --download (download=True) to fetch the original where the network allows."
    )


def _python_layout_dir(name: str, data_dir: Path) -> Path | None:
    folder, train_files, test_file, _, _ = _CIFAR_PYTHON[name]
    # Accept both the parent torchvision downloads into and the batches folder itself.
    for candidate in (data_dir / folder, data_dir):
        if all((candidate / f).is_file() for f in (*train_files, test_file)):
            return candidate
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        # The CIFAR files are Python 2 pickles; bytes keys keep them readable without guessing an encoding.
        return pickle.load(f, encoding="bytes")


def _read_python_layout(name: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    _, train_files, test_file, label_key, num_classes = _CIFAR_PYTHON[name]

    def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for file in files:
            entry = _unpickle(root / file)
            if b"data" not in entry or label_key not in entry:
                raise ValueError(f"{root / file} lacks the b'data' or {label_key!r} entry of a {name} batch file")
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{root / file}: b'data' must be N x 3072 uint8, got shape {data.shape}")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train_x, train_y = read(train_files)
    test_x, test_y = read((test_file,))
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} {split} labels in {root} must lie in [0, {num_classes})")
    return train_x, train_y, test_x, test_y


@dataclass(frozen=True)
class _ImageFile:
    path: str
    label: int
    size: int
    mtime_ns: int


def _image_folder_files(root: Path, classes: list[str]) -> list[_ImageFile]:
    files = []
    for label, cls in enumerate(classes):
        # os.scandir gives type and stat without a second system call per file: 60,000 files list in ~0.1 s.
        with os.scandir(root / cls) as entries:
            found = [e for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
        for entry in sorted(found, key=lambda e: e.name):
            stat = entry.stat()
            files.append(_ImageFile(entry.path, label, stat.st_size, stat.st_mtime_ns))
    return files


def _decode_image(path: str) -> np.ndarray:
    """One image file to a 3x32x32 uint8 array (RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.size != (32, 32):
            raise ValueError(f"{path}: images must be 32x32, got {image.size[0]}x{image.size[1]}")
        return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def _cache_key(data_dir: Path, files: list[_ImageFile]) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_FORMAT_VERSION}\0{data_dir.resolve()}\0".encode())
    # Every path starts with str(data_dir); hashing the rest keeps the key independent of how it was spelled.
    prefix = len(str(data_dir))
    for f in files:
        digest.update(f"{f.path[prefix:]}\0{f.label}\0{f.size}\0{f.mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


_SPLIT_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def _map_cache(path: Path) -> dict[str, np.ndarray]:
    # Copy-on-write maps: every process (and every container on a shared cache volume) that loads the data
    # set shares one copy of its pages in the page cache instead of holding a private one.
    return {k: np.load(path / f"{k}.npy", mmap_mode="c", allow_pickle=False) for k in _SPLIT_ARRAYS}


def _write_cache_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a folder next to the target and rename it, so a reader never sees a half-written entry.
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp"))
    try:
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array, allow_pickle=False)
            os.chmod(tmp / f"{key}.npy", 0o644)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache may be shared by users and containers.
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp)  # another process wrote the same entry first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cached(entry: str, what: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of cache entry `entry` (a folder of .npy files under `cache_dir()`), memory-mapped; on a miss
    `make()` builds them and they are written for the next load."""
    path = cache_dir() / entry
    if path.is_dir():
        try:
            arrays = _map_cache(path)
            logger.info("loaded %s from cache %s", what, path)
            return arrays
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache %s (%s); reading %s again", path, exc, what)
            shutil.rmtree(path, ignore_errors=True)
    arrays = make()
    try:
        _write_cache_atomically(path, arrays)
        return _map_cache(path)
    except OSError as exc:
        logger.warning("could not write cache %s (%s); the next load reads %s again", path, exc, what)
        return arrays


def _read_image_folder(name: str, data_dir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    num_classes = _CIFAR_PYTHON[name][4]
    classes = sorted(p.name for p in (data_dir / "train").iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in (data_dir / "test").iterdir() if p.is_dir())
    if len(classes) != num_classes:
        raise ValueError(f"{name} needs {num_classes} class folders in {data_dir / 'train'}, found {len(classes)}")
    if test_classes != classes:
        raise ValueError(f"class folders differ between {data_dir / 'train'} and {data_dir / 'test'}")
    train_files = _image_folder_files(data_dir / "train", classes)
    test_files = _image_folder_files(data_dir / "test", classes)
    if not train_files or not test_files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {data_dir}/train or {data_dir}/test")

    def decode_all() -> dict[str, np.ndarray]:
        logger.info("decoding %d %s images from %s (cached afterwards)", len(train_files) + len(test_files), name,
                    data_dir)
        arrays = {}
        for split, files in (("train", train_files), ("test", test_files)):
            x = np.empty((len(files), 3, 32, 32), dtype=np.uint8)
            for i, f in enumerate(files):
                x[i] = _decode_image(f.path)
            arrays[f"{split}_x"], arrays[f"{split}_y"] = x, np.array([f.label for f in files], dtype=np.int64)
        return arrays

    key = _cache_key(data_dir, train_files + test_files)
    return _cached(f"{name}-imagefolder-{key}", f"decoded {name} images", decode_all), classes


def _read_python_layout_cached(name: str, root: Path) -> dict[str, np.ndarray]:
    """The python batches, through the cache: unpickling gives every process a private copy of the images;
    the cache's mapped arrays are shared."""
    _, train_files, test_file, _, _ = _CIFAR_PYTHON[name]
    files = []
    for file in (*train_files, test_file):
        stat = (root / file).stat()
        files.append(_ImageFile(str(root / file), 0, stat.st_size, stat.st_mtime_ns))

    def read() -> dict[str, np.ndarray]:
        return dict(zip(_SPLIT_ARRAYS, _read_python_layout(name, root), strict=True))

    return _cached(f"{name}-batches-{_cache_key(root, files)}", f"{name} batches", read)


def _download_cifar(name: str, data_dir: Path) -> None:
    import torchvision

    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    logger.info("downloading %s into %s", name, data_dir)
    for train in (True, False):
        dataset_class(root=str(data_dir), train=train, download=True)


def _load_cifar(name: str, data_dir: str | None, download: bool) -> Dataset:
    root = Path(data_dir) if data_dir is not None else cache_dir() / "data"
    python_dir = _python_layout_dir(name, root)
    is_image_folder = (root / "train").is_dir() and (root / "test").is_dir()
    if python_dir is None and not is_image_folder and download:
        _download_cifar(name, root)
        python_dir = _python_layout_dir(name, root)
    classes: list[str] = []
    if python_dir is not None:
        arrays = _read_python_layout_cached(name, python_dir)
    elif is_image_folder:
        arrays, classes = _read_image_folder(name, root)
    else:
        problem = "does not exist" if not root.exists() else "holds neither layout"
        raise FileNotFoundError(f"{name}: {root} {problem}; {_layout_help(name, root)}")
    mean, std = CIFAR_STATS[name]
    logger.info("%s: %d train / %d test images", name, len(arrays["train_x"]), len(arrays["test_x"]))
    return Dataset(
        name=name,
        **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
        num_classes=_CIFAR_PYTHON[name][4],
        input_shape=(3, 32, 32),
        mean=mean,
        std=std,
        augment=True,
        classes=tuple(classes),
    )


DIGITS_TRAIN_SIZE = 1500
DIGITS_SPLIT_SEED = 0


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 bundled 8x8 digits (pixel values 0..16) and their labels.

    Read from the CSV file scikit-learn ships, without importing scikit-learn: its import (SciPy included)
    costs about 80 MB of private memory in every worker process, which adds up over 64 worker containers.
    `sklearn.datasets.load_digits` reads the same file; it is the fallback should the file move.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def _load_digits(data_dir: str | None, download: bool, synthetic_size: int) -> Dataset:
    pixels, target = _digits_arrays()
    images = torch.from_numpy(pixels / 16.0).unsqueeze(1)
    labels = torch.from_numpy(target)
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    order = torch.randperm(len(images), generator=generator)
    train, test = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    train_x = images[train].contiguous()
    return Dataset(
        name="digits",
        train_x=train_x,
        train_y=labels[train].contiguous(),
        test_x=images[test].contiguous(),
        test_y=labels[test].contiguous(),
        num_classes=10,
        input_shape=(1, 8, 8),
        mean=(float(train_x.mean()),),
        std=(float(train_x.std()),),
        augment=False,
        classes=tuple(str(c) for c in range(10)),
    )


SYNTHETIC_SEED = 0
SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_SHAPE = (3, 8, 8)
SYNTHETIC_NOISE = 3.0


def make_synthetic(
    train_size: int = 2000,
    test_size: int = 500,
    num_classes: int = SYNTHETIC_NUM_CLASSES,
    input_shape: tuple[int, ...] = SYNTHETIC_SHAPE,
    noise: float = SYNTHETIC_NOISE,
    seed: int = SYNTHETIC_SEED,
) -> Dataset:
    """Gaussian clusters around fixed random class centres: learnable, deterministic, no files needed."""
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, *input_shape, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=generator)
        return centres[y] + noise * torch.randn(n, *input_shape, generator=generator), y

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    channels = input_shape[0] if len(input_shape) == 3 else 1
    # Samples have mean ~0 and std ~sqrt(1 + noise^2) per coordinate; normalise to unit scale.
    scale = math.sqrt(1.0 + noise**2)
    return Dataset(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        mean=(0.0,) * channels,
        std=(scale,) * channels,
        augment=False,
        classes=tuple(str(c) for c in range(num_classes)),
    )


def _load_synthetic(data_dir: str | None, download: bool, synthetic_size: int) -> Dataset:
    return make_synthetic(train_size=synthetic_size, test_size=max(1, synthetic_size // 4))


DatasetLoader = Callable[[str | None, bool, int], Dataset]

DATASETS: dict[str, DatasetLoader] = {
    "cifar10": lambda data_dir, download, synthetic_size: _load_cifar("cifar10", data_dir, download),
    "cifar100": lambda data_dir, download, synthetic_size: _load_cifar("cifar100", data_dir, download),
    "digits": _load_digits,
    "synthetic": _load_synthetic,
}


def resolve_dataset(name: str) -> DatasetLoader | Callable[..., object]:
    """The loader of a registered name or of an import path (`my_pkg.data:load`, imported here); a ValueError
    saying what is wrong otherwise (unknown name, module not found, attribute missing)."""
    return resolve(DATASETS, name, "dataset")


def _materialise(split: torch.utils.data.Dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) samples of a map-style torch data set as one float32 tensor and one int64 label vector."""
    from torch.utils.data import DataLoader

    try:
        n = len(split)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a map-style torch data set (with __len__ and __getitem__)") from None
    if n == 0:
        raise ValueError(f"{what} is empty")
    xs, ys = [], []
    for batch in DataLoader(split, batch_size=1024, shuffle=False):
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)
                and isinstance(batch[1], torch.Tensor)):
            raise ValueError(f"{what}'s samples must be (x, y) pairs of tensors (and numbers), such as "
                             "ToTensor() makes of images")
        xs.append(batch[0].to(torch.float32))
        ys.append(batch[1])
    y = torch.cat(ys)
    if y.dtype.is_floating_point or y.dim() != 1:
        raise ValueError(f"{what}'s labels must be integer class indexes, got {y.dtype} of shape {tuple(y.shape)}")
    return torch.cat(xs), y.to(torch.int64)


def from_torch_datasets(name: str, train: torch.utils.data.Dataset, test: torch.utils.data.Dataset,
                        num_classes: int | None = None) -> Dataset:
    """A `Dataset` from a (train, test) pair of map-style torch data sets of (x, y) samples, read once into
    memory as they are (their own transforms applied; no normalisation or augmentation added here).
    `num_classes` defaults to the train set's `classes` (torchvision's convention), else the largest label + 1."""
    train_x, train_y = _materialise(train, f"dataset {name!r}: the train set")
    test_x, test_y = _materialise(test, f"dataset {name!r}: the test set")
    if num_classes is None:
        classes = getattr(train, "classes", None)
        num_classes = len(classes) if classes else int(max(train_y.max(), test_y.max())) + 1
    return Dataset(name=name, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, num_classes=num_classes,
                   input_shape=tuple(train_x.shape[1:]), mean=(0.0,), std=(1.0,), augment=False)


def _load_imported(name: str, data_dir: str | None) -> Dataset:
    loader = resolve_dataset(name)
    loaded = call_imported(loader, name, "dataset", (data_dir,), "(data_dir)")
    if isinstance(loaded, Dataset):
        return loaded
    if (isinstance(loaded, (tuple, list)) and len(loaded) == 2
            and all(isinstance(split, torch.utils.data.Dataset) for split in loaded)):
        return from_torch_datasets(name, *loaded)
    raise ValueError(f"dataset {name!r} returned a {type(loaded).__name__}; expected a ormo_ps.common.data.Dataset "
                     "(ormo_ps.Dataset) or a (train, test) pair of torch.utils.data.Dataset")


def load_dataset(
    name: str, data_dir: str | None = None, download: bool = False, synthetic_size: int = 2000
) -> Dataset:
    """Load a registered dataset, or the one an import path names, into memory.

    `data_dir` and `download` only matter for CIFAR (`data_dir=None` means `cache_dir() / "data"`);
    `synthetic_size` is the synthetic train-set size (its test set is a quarter of that). An import path
    (`my_pkg.data:load`) names a callable taking `data_dir`, or nothing, and returning a `Dataset` or a
    (train, test) pair of torch data sets (`from_torch_datasets`).
    """
    if is_import_path(name):
        return _load_imported(name, data_dir)
    loader = resolve_dataset(name)
    if synthetic_size < 1:
        raise ValueError(f"synthetic_size must be >= 1, got {synthetic_size}")
    return loader(data_dir, download, synthetic_size)
