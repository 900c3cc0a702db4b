"""The zoo's commands: `convnext-deploy variants`, `inspect CHECKPOINT` and `reference` (train or reuse one)."""
from __future__ import annotations

import json
from pathlib import Path


def variants(args) -> int:
    from convnext_deploy.pipeline.models.variants import VARIANTS

    print(f"{'name':6} {'model':15} {'depths':14} {'dims':22} {'params@1k':>12}  ImageNet-1k top-1")
    for v in VARIANTS.values():
        top1 = f"{v.imagenet_top1:.1f}" if v.imagenet_top1 is not None else "—"
        print(f"{v.name:6} {v.long_name:15} {str(v.depths):14} {str(v.dims):22} {v.params_1k:>12,}  {top1} ({v.imagenet_note})")
    return 0


def inspect(args) -> int:
    from convnext_deploy.pipeline.models.checkpoints import load_checkpoint
    from convnext_deploy.pipeline.models.convnext import count_parameters

    ck = load_checkpoint(args.checkpoint, args.variant)
    info = {
        "path": str(ck.path),
        "format": ck.source_format,
        "variant": ck.variant.name,
        "model": ck.variant.long_name,
        "num_classes": ck.num_classes,
        "class_names": list(ck.class_names[:10]) + (["…"] if ck.num_classes > 10 else []),
        "parameters": count_parameters(ck.model),
        "preprocessing": ck.preprocessing.to_dict(),
        "sha256": ck.sha256,
    }
    for key in ("dataset", "accuracy"):
        if ck.metadata.get(key):
            info[key] = ck.metadata[key]
    if ck.labels_note:
        info["labels_note"] = ck.labels_note
    print(json.dumps(info, indent=2))
    return 0


def reference(args) -> int:
    from convnext_deploy.pipeline.models.checkpoints import load_checkpoint
    from convnext_deploy.pipeline.models.reference import reference_path
    from convnext_deploy.pipeline.models.train import recipe_for, train_reference

    out = Path(args.out) if args.out else reference_path(args.variant)
    if out.with_suffix(".safetensors").exists() and out.with_suffix(".json").exists() and not args.force:
        ck = load_checkpoint(out, args.variant)
        acc = ck.metadata.get("accuracy", {}).get("top1")
        print(f"{out} exists (test top-1 {acc * 100:.2f}%); --force retrains")
        return 0
    recipe = recipe_for(args.variant, **{k: v for k, v in (("epochs", args.epochs), ("image_size", args.image_size),
                                                           ("lr", args.lr)) if v is not None})
    path = train_reference(recipe, out, log=lambda m: print(m, flush=True))
    ck = load_checkpoint(path)
    print(f"saved {path}: {ck.variant.long_name}, Fashion-MNIST test top-1 "
          f"{ck.metadata['accuracy']['top1'] * 100:.2f}% at {recipe.image_size}px")
    return 0
