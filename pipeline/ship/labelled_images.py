"""The labelled images `validate --images DIR [--labels FILE]` measures top-1 on: an ImageFolder tree, or a flat
folder with a CSV of `file,label` lines."""
from __future__ import annotations

import csv
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError


class ListedImages:
    """A flat folder of images with a CSV of `file,label` lines (label: a class name of labels.txt or its index)."""

    def __init__(self, root: Path, labels_file: Path, class_names: list[str]):
        self.root, self.class_names, self.name = Path(root), tuple(class_names), f"listed:{labels_file}"
        index = {n: i for i, n in enumerate(class_names)}
        self.samples = []
        try:
            rows = list(csv.reader(Path(labels_file).read_text().splitlines()))
        except OSError as e:
            raise UserError(f"cannot read --labels {labels_file} ({e})") from None
        for n, row in enumerate(rows, 1):
            if not row or row[0].startswith("#") or (n == 1 and row[-1].strip().lower() == "label"):
                continue
            label = row[-1].strip() if len(row) == 2 else None
            y = index.get(label) if label is not None else None
            if y is None and label is not None and label.isdigit() and int(label) < len(class_names):
                y = int(label)
            if y is None:
                raise UserError(f"{labels_file}:{n}: expected `file,label` with a class name of labels.txt or an "
                                f"index below {len(class_names)}, got {','.join(row)!r}")
            if not (self.root / row[0]).is_file():
                raise UserError(f"{labels_file}:{n}: {self.root / row[0]} not found")
            self.samples.append((self.root / row[0], y))
        if not self.samples:
            raise UserError(f"{labels_file} lists no images (`file,label` lines)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy(), label
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UserError(f"corrupt or unreadable image {path} ({e}); replace it or drop its line") from None

    def sample_id(self, i: int) -> str:
        return str(self.samples[i][0])


def labelled_source(images: Path, labels: Path | None, class_names: list[str]):
    from convnext_deploy.calibration.imagefolder import ImageFolder

    if labels is not None:
        return ListedImages(images, labels, class_names)
    return ImageFolder(images, class_names)
