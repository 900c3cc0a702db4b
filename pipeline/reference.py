"""Where reference checkpoints (ConvNeXt trained on Fashion-MNIST here) live, and how to get one."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.variants import get_variant


def reference_dir() -> Path:
    return Path(os.environ.get("CONVNEXT_DEPLOY_REFERENCE_DIR", "reference"))


def reference_path(variant: str) -> Path:
    return reference_dir() / f"convnext_{get_variant(variant).name}_fashion-mnist.safetensors"


def require_reference(variant: str) -> Path:
    path = reference_path(variant)
    if not path.exists() or not path.with_suffix(".json").exists():
        name = get_variant(variant).name
        raise UserError(
            f"no reference checkpoint for {name} at {path}; make it with `make reference VARIANT={name}` "
            "or pass --checkpoint PATH"
        )
    return path
