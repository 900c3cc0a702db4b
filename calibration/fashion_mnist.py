"""Fashion-MNIST read from its gzipped IDX files (Debian's `dataset-fashion-mnist` package)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from convnext_deploy.pipeline.core.errors import UserError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (or `make setup`), or set FASHION_MNIST_ROOT"


def default_root() -> Path:
    return Path(os.environ.get("FASHION_MNIST_ROOT", DEFAULT_ROOT))


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic, big-endian dims, then unsigned bytes."""
    if not path.is_file():
        raise UserError(f"Fashion-MNIST file not found: {path}; {_INSTALL_HINT}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"unreadable IDX file {path} ({e}); reinstall it ({_INSTALL_HINT})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic); reinstall it ({_INSTALL_HINT})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise UserError(f"{path}: truncated IDX header; reinstall it ({_INSTALL_HINT})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise UserError(
            f"{path}: IDX header promises {expected} bytes of data but the file holds {len(data) - header}; "
            f"the file is truncated or corrupt, reinstall it ({_INSTALL_HINT})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST:
    """One split of Fashion-MNIST as a sequence of (PIL image, label)."""

    def __init__(self, split: str = "train", root: Path | str | None = None):
        if split not in _FILES:
            raise UserError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
        self.split = split
        self.root = Path(root) if root is not None else default_root()
        img_file, lbl_file = _FILES[split]
        self.images = read_idx(self.root / img_file)
        self.labels = read_idx(self.root / lbl_file).astype(np.int64)
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise UserError(
                f"Fashion-MNIST {split} files disagree: images {self.images.shape}, labels {self.labels.shape}; "
                f"reinstall them ({_INSTALL_HINT})"
            )
        self.class_names = CLASS_NAMES
        self.name = f"fashion-mnist/{split}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L"), int(self.labels[i])

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def sample_id(self, i: int) -> str:
        return f"{self.name}#{i}"
