"""An ImageFolder tree (`root/<class>/<image>`), the layout of ImageNet val for users who have it.

Only the file list is held in memory; images are opened one at a time as they are read, so a
50,000-image tree streams in bounded memory.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolder:
    def __init__(self, root: Path | str, class_names: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"image folder not found: {self.root}; pass a directory laid out as root/<class>/<image>")
        dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not dirs:
            raise UserError(
                f"{self.root} holds no class folders; lay images out as {self.root}/<class>/<image>.jpg"
            )
        self.label_rule = self._label_rule([d.name for d in dirs], class_names)
        if self.label_rule == "names":
            names = list(class_names)
        else:  # torchvision's convention, and ImageNet's: label = position in the sorted folder names
            names = [d.name for d in dirs]
        index = {n: i for i, n in enumerate(names)}
        self.samples: list[tuple[Path, int]] = []
        for d in dirs:
            files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove it")
            self.samples.extend((p, index[d.name]) for p in files)
        self.class_names = tuple(names)
        self.name = f"imagefolder:{self.root.resolve()}"

    def _label_rule(self, folders: list[str], class_names: list[str] | None) -> str:
        """How folder names become label indices: by the checkpoint's class names when every folder is one
        of them; otherwise by sorted folder order (ImageNet's wnid folders map to the 1k indices this way),
        which needs exactly one folder per class."""
        if class_names is None or set(folders) <= set(class_names):
            return "names" if class_names is not None else "sorted folders"
        if len(folders) == len(class_names):
            return "sorted folders"
        raise UserError(
            f"{self.root} has {len(folders)} class folders, but the checkpoint has {len(class_names)} classes and "
            f"the folder names (e.g. {folders[0]!r}) are not its class names; use one folder per class, named "
            "as the classes or ordered as the checkpoint's label indices"
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy(), label
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UserError(f"corrupt or unreadable image {path} ({e}); replace or delete it") from None

    def sample_id(self, i: int) -> str:
        return str(self.samples[i][0].resolve())
