"""Where reference checkpoints (ConvNeXt trained on Fashion-MNIST here) live, and how to get one."""
from __future__ import annotations

import os
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.variants import get_variant


def reference_dir() -> Path:
    return Path(os.environ.get("CONVNEXT_DEPLOY_REFERENCE_DIR", "reference"))


def reference_path(variant: str) -> Path:
    return reference_dir() / f"convnext_{get_variant(variant).name}_fashion-mnist.safetensors"


def ensure_reference(variant: str, train: bool, log=print) -> Path:
    """The variant's reference checkpoint; trained here when missing and `train` (a deploy on a fresh machine needs
    no separate step), else one line saying how to make it."""
    path = reference_path(variant)
    if train and not (path.exists() and path.with_suffix(".json").exists()):
        from convnext_deploy.pipeline.models.train import recipe_for, train_reference

        recipe = recipe_for(variant)
        log(f"no reference checkpoint for {get_variant(variant).long_name} at {path}: training it now on "
            f"Fashion-MNIST ({recipe.epochs} epochs at {recipe.image_size} px; `make reference VARIANT={variant}` does "
            "the same; --no-train-reference refuses instead)")
        train_reference(recipe, path, log=log)
    return require_reference(variant)


def require_reference(variant: str) -> Path:
    path = reference_path(variant)
    if not path.exists() or not path.with_suffix(".json").exists():
        name = get_variant(variant).name
        raise UserError(
            f"no reference checkpoint for {name} at {path}; make it with `make reference VARIANT={name}` "
            "or pass --checkpoint PATH"
        )
    return path
