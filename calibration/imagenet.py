"""ImageNet-1k's 1,000 classes: WordNet id (wnid) and name, in the index order of every published 1k head.

`imagenet1k_classes.tsv` is ILSVRC-2012's synset_words.txt (the list Caffe, Kaggle's LOC_synset_mapping.txt
and Hugging Face's id2label carry) as `wnid<TAB>name`, one class a line after the header. A 1k head's output
index is the position of the wnid in the *sorted* wnid list (torchvision's ImageFolder on ImageNet's wnid
folders made that the convention), and the file is in that order; `imagenet_1k()` refuses a file that is not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError

CLASSES_FILE = Path(__file__).with_name("imagenet1k_classes.tsv")
NUM_CLASSES = 1000
WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ClassList:
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    index: dict[str, int] = field(compare=False, repr=False)  # wnid → output index


def is_wnid(name: str) -> bool:
    return WNID.fullmatch(name) is not None


def read_class_list(path: Path) -> ClassList:
    """A `wnid<TAB>name` file with a header line, checked: unique wnids in sorted order."""
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    bad = next((i for i, r in enumerate(rows) if len(r) != 2 or not is_wnid(r[0]) or not r[1].strip()), None)
    if bad is not None:
        raise UserError(f"{path} line {bad + 2} is not 'wnid<TAB>name': {chr(9).join(rows[bad])!r}")
    wnids = tuple(r[0] for r in rows)
    if len(set(wnids)) != len(wnids) or list(wnids) != sorted(wnids):
        raise UserError(f"{path}: the wnids must be unique and sorted (a head's index order is the sorted wnids)")
    return ClassList(wnids, tuple(r[1].strip() for r in rows), {w: i for i, w in enumerate(wnids)})


@lru_cache(maxsize=1)
def imagenet_1k() -> ClassList:
    classes = read_class_list(CLASSES_FILE)
    if len(classes.wnids) != NUM_CLASSES:  # the file ships with the package: a short one is a broken install
        raise UserError(f"{CLASSES_FILE} holds {len(classes.wnids)} classes, not {NUM_CLASSES}; reinstall convnext-deploy")
    return classes
