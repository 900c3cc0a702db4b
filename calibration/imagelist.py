"""Unlabelled images for calibration: a flat folder of images, or a text file listing image paths.

Calibration needs no labels, and a folder of images or a list of image files is how the toolchains' own
calibration readers take data. Only the paths are held; images are opened as they are read. Samples carry
the label -1: nothing may score against it.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from convnext_deploy.calibration.imagefolder import IMAGE_SUFFIXES, ImageFolder, image_files, read_image
from convnext_deploy.pipeline.core.errors import UserError

UNLABELLED = -1
ACCEPTED = ("an ImageFolder tree (root/<class>/<image>), a flat folder of images, or a text file listing image "
            "paths one a line")


class ImageList:
    """`paths` in the order given; `name` says where they came from, `sample_id` is the resolved path so the
    split's overlap check compares them with an evaluation tree's images."""

    def __init__(self, paths: list[Path], origin: Path):
        self.paths = paths
        self.class_names: tuple[str, ...] = ()
        self.name = f"images:{origin.resolve()}"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return read_image(self.paths[i]), UNLABELLED

    def sample_id(self, i: int) -> str:
        return str(self.paths[i].resolve())


def flat_folder(root: Path) -> ImageList:
    files = image_files(root)  # the same rule as a tree's class folders: junk skipped, empty files named
    if not files:
        raise UserError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no class folders; pass {ACCEPTED}")
    return ImageList(files, root)


def file_list(path: Path) -> ImageList:
    """One image path a line; blank lines and `#` comments skipped; a relative path is relative to the list's
    folder, so a list travels with its images."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file of image paths; pass {ACCEPTED}") from None
    paths: list[Path] = []
    for n, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise UserError(f"{path} line {n}: image not found: {p}; fix or remove the line")
        paths.append(p)
    if not paths:
        raise UserError(f"{path} lists no images; put one image path a line")
    return ImageList(paths, path)


def calibration_source(path: Path | str, class_names: list[str] | None = None):
    """What `--calib-data` names: an ImageFolder tree (labels used to balance classes, as for evaluation), or
    unlabelled images in a flat folder or a file list."""
    path = Path(path)
    if path.is_file():
        return file_list(path)
    if not path.is_dir():
        raise UserError(f"calibration data not found: {path}; pass {ACCEPTED}")
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return ImageFolder(path, class_names)
    return flat_folder(path)
