"""An ImageFolder tree (`root/<class>/<image>`), the layout of ImageNet val for users who have it.

Only the file list is held in memory; images are opened one at a time as they are read, so a
50,000-image tree streams in bounded memory. Files are images by their suffix; what operating systems drop into
folders (hidden files, macOS `._name.jpg` companions, `Thumbs.db`, `desktop.ini`, `__MACOSX/`) is skipped unread.
An image file that cannot be decoded stops the run with one line naming it: an empty one when the tree is listed,
a truncated or corrupt one when it is read.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from convnext_deploy.calibration.imagenet import CLASSES_FILE, NUM_CLASSES, imagenet_1k, is_wnid
from convnext_deploy.pipeline.core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm",
                  ".pbm", ".pnm")
SKIPPED_DIRS = ("__MACOSX",)  # a macOS zip's folder of AppleDouble companions, never a class
WNID_RULE = "ImageNet-1k wnids"


class ImageFolder:
    def __init__(self, root: Path | str, class_names: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"image folder not found: {self.root}; pass a directory laid out as root/<class>/<image>")
        dirs = sorted(p for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name not in SKIPPED_DIRS)
        if not dirs:
            raise UserError(
                f"{self.root} holds no class folders; lay images out as {self.root}/<class>/<image>.jpg"
            )
        self.label_rule = self._label_rule([d.name for d in dirs], class_names)
        if self.label_rule == "names":
            names, index = list(class_names), {n: i for i, n in enumerate(class_names)}
        elif self.label_rule == WNID_RULE:  # a subset of ImageNet's folders keeps the 1k head's indices
            names, index = list(class_names), imagenet_1k().index
        else:  # torchvision's convention, and ImageNet's: label = position in the sorted folder names
            names = [d.name for d in dirs]
            index = {n: i for i, n in enumerate(names)}
        self.samples: list[tuple[Path, int]] = []
        for d in dirs:
            files = image_files(d)
            if not files:
                raise UserError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove it")
            self.samples.extend((p, index[d.name]) for p in files)
        self.class_names = tuple(names)
        self.name = f"imagefolder:{self.root.resolve()}"

    def _label_rule(self, folders: list[str], class_names: list[str] | None) -> str:
        """How folder names become label indices: by the checkpoint's class names when every folder is one
        of them; for a 1,000-class head and wnid folders (n01440764, …), by ImageNet-1k's wnid list, so any
        subset of the classes maps to the right outputs; otherwise by sorted folder order, which needs exactly
        one folder per class."""
        if class_names is None or set(folders) <= set(class_names):
            return "names" if class_names is not None else "sorted folders"
        if len(class_names) == NUM_CLASSES and all(is_wnid(f) for f in folders):
            unknown = [f for f in folders if f not in imagenet_1k().index]
            if unknown:
                raise UserError(
                    f"{self.root}: {len(unknown)} class folder(s) are not ImageNet-1k wnids (e.g. {unknown[0]!r}); "
                    f"a 1,000-class head's folders must be among the 1k classes listed in {CLASSES_FILE.name}"
                )
            return WNID_RULE
        if len(folders) == len(class_names):
            return "sorted folders"
        raise UserError(
            f"{self.root} has {len(folders)} class folders, but the checkpoint has {len(class_names)} classes and "
            f"the folder names (e.g. {folders[0]!r}) are not its class names; use one folder per class, named "
            "as the classes or ordered as the checkpoint's label indices (or ImageNet wnids for a 1k head)"
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return read_image(path), label

    def label(self, i: int) -> int:
        """The label of sample i, without decoding its image."""
        return self.samples[i][1]

    def sample_id(self, i: int) -> str:
        return str(self.samples[i][0].resolve())


def image_files(folder: Path) -> list[Path]:
    """The images of one folder, sorted: files with an image suffix (Pillow reads them by content, so a PNG named
    .jpg is read as the PNG it is). Names starting with "." are skipped: .DS_Store and the `._photo.jpg`
    AppleDouble files macOS writes beside each image on foreign disks, which carry the image's suffix but hold
    no image; `Thumbs.db`, `desktop.ini` and any other file without an image suffix are skipped too. An empty
    image file (a download that broke off before its first byte) is refused here, naming it, before anything runs."""
    files = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for p in files:
        if p.stat().st_size == 0:
            raise UserError(f"empty image file {p} (0 bytes); replace or delete it")
    return files


def read_image(path: Path) -> Image.Image:
    """One image, decoded now, or a one-line UserError naming the file (truncated, corrupt, not an image, or
    larger than Pillow's decompression-bomb limit)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UserError(f"corrupt or unreadable image {path} ({e}); replace or delete it") from None
