"""Checkpoints: read a file, map its layout onto our model (pipeline.models.checkpoint_layouts: official,
timm, Hugging Face), load strictly, save ours.

- ours      safetensors + JSON sidecar (variant, classes, preprocessing, recipe, accuracy, sha256)
Only torch and safetensors are imported here.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convnext_deploy.pipeline.core.cache import publish_file, sha256_file
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.checkpoint_layouts import detect_format, rename_to_ours
from convnext_deploy.pipeline.models.convnext import ConvNeXt, create_model
from convnext_deploy.pipeline.models.variants import Preprocessing, Variant, get_variant, variant_from_dims

FORMAT_TAG = "convnext-deploy/checkpoint-v1"
SIDECAR_SUFFIX = ".json"

def to_our_keys(sd: dict) -> tuple[dict, str]:
    """The checkpoint filter: map any known layout onto our parameter names."""
    fmt = detect_format(sd)
    if fmt == "unknown":
        sample = ", ".join(list(sd)[:4])
        raise UserError(
            f"not a ConvNeXt checkpoint in any known layout (official, timm, Hugging Face); first keys: {sample}"
        )
    return rename_to_ours(sd, fmt), fmt


@dataclass
class Architecture:
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    num_classes: int
    in_chans: int

    @property
    def variant(self) -> Variant | None:
        return variant_from_dims(self.depths, self.dims)


def infer_architecture(sd: dict) -> Architecture:
    """Read depths, widths, class count and input channels off a state dict in our names."""
    try:
        stem = sd["stem.0.weight"]
        head = sd["head.fc.weight"]
    except KeyError as e:
        raise UserError(f"checkpoint has no {e.args[0]!r}: it is not a complete ConvNeXt classifier") from None
    depths, dims = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"^stages\.{i}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise UserError(f"checkpoint has no blocks in stage {i}: it is not a complete ConvNeXt")
        depths.append(max(blocks) + 1)
        dims.append(int(sd[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]))
    return Architecture(tuple(depths), tuple(dims), int(head.shape[0]), int(stem.shape[1]))


def load_state_dict_strict(model: ConvNeXt, sd: dict, source: str) -> None:
    """Load, listing every missing, unexpected and wrong-shape key in one error."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {', '.join(wrong)}")
    if problems:
        raise UserError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- reading files


def _read_torch(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "GLOBAL" not in msg:  # not a pickle of objects at all: garbage or a truncated file
            raise UserError(f"cannot read {path} as a torch checkpoint (not a valid pickle); is the file complete?") from None
        culprit = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln), "")
        raise UserError(
            f"refused to load {path}: it holds Python objects beyond tensors, which could run code "
            f"({culprit}); load only checkpoints you trust, re-saved as a plain state dict or safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a torch checkpoint ({str(e).splitlines()[0]}); is the file complete?") from None
    for wrapper in ("model", "state_dict", "model_ema"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return obj


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as safetensors ({e}); is the file complete?") from None


def _hf_files(directory: Path) -> tuple[Path, dict]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            config_path = directory / "config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            return directory / name, config
    raise UserError(f"{directory} holds no model.safetensors or pytorch_model.bin; point at a checkpoint file")


def read_state_dict(path: Path) -> tuple[dict, dict]:
    """Read weights and whatever metadata travels with them (our sidecar, an HF config)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    meta: dict = {}
    if path.is_dir():
        path, config = _hf_files(path)
        meta["hf_config"] = config
    sidecar = path.with_suffix(SIDECAR_SUFFIX)
    if path.suffix == ".safetensors":
        sd = _read_safetensors(path)
        if sidecar.is_file():
            meta["sidecar"] = json.loads(sidecar.read_text())
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = _read_torch(path)
    else:
        raise UserError(f"unsupported checkpoint file {path.name}: use .pth, .pt, .bin or .safetensors")
    if not sd:
        raise UserError(f"{path} holds no tensors")
    meta["path"] = str(path)
    return sd, meta


# ---------------------------------------------------------------- the one entry point

@dataclass
class LoadedCheckpoint:
    model: ConvNeXt
    variant: Variant
    source_format: str
    num_classes: int
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    path: Path
    sha256: str
    metadata: dict = field(default_factory=dict)  # our sidecar, if any
    labels_note: str = ""  # where the class names came from, when the checkpoint itself does not name its classes


def load_checkpoint(path: Path | str, variant: str | None = None) -> LoadedCheckpoint:
    """Build the model a checkpoint describes and load it strictly.

    `variant`, when given, must match the checkpoint; the class count always comes from the checkpoint.
    """
    path = Path(path)
    raw, meta = read_state_dict(path)
    sd, fmt = to_our_keys(raw)
    arch = infer_architecture(sd)
    found = arch.variant
    if variant is not None:
        wanted = get_variant(variant)
        if found is None or found.name != wanted.name:
            what = found.long_name if found else f"non-standard ConvNeXt (depths {arch.depths}, dims {arch.dims})"
            raise UserError(f"this is a {what} checkpoint, you asked for {wanted.long_name}: {path}")
    if found is None:
        raise UserError(f"{path}: depths {arch.depths} / dims {arch.dims} match no ConvNeXt variant in the table")
    model = create_model(found, num_classes=arch.num_classes, in_chans=arch.in_chans)
    if fmt == "hf" and "layer_norm_eps" in meta.get("hf_config", {}):
        # transformers uses config.layer_norm_eps (1e-12 in the published configs) for the final norm only.
        model.head.norm.eps = float(meta["hf_config"]["layer_norm_eps"])
    load_state_dict_strict(model, sd, str(path))
    model.eval()

    file_path = Path(meta["path"])
    digest = sha256_file(file_path)
    sidecar = meta.get("sidecar")
    class_names: tuple[str, ...] = tuple(str(i) for i in range(arch.num_classes))
    pp = found.preprocessing
    if sidecar is not None:
        if sidecar.get("format") != FORMAT_TAG:
            raise UserError(f"{file_path.with_suffix(SIDECAR_SUFFIX)} is not a convnext-deploy sidecar")
        if sidecar.get("sha256") != digest:
            raise UserError(
                f"{file_path} does not match the sha256 in its sidecar: the weights changed or the copy is "
                "incomplete; re-copy both files"
            )
        class_names = tuple(sidecar["class_names"])
        pp = Preprocessing.from_dict(sidecar["preprocessing"])
        fmt = "ours"
    elif "hf_config" in meta and meta["hf_config"].get("id2label"):
        id2label = meta["hf_config"]["id2label"]
        class_names = tuple(id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(arch.num_classes))
    if sidecar is None:
        pp = fine_tuned_resolution(pp, meta.get("hf_config", {}), file_path)
    if len(class_names) != arch.num_classes:
        raise UserError(f"{file_path}: {len(class_names)} class names for a {arch.num_classes}-class head")
    note = ""
    if fmt != "ours":
        class_names, note = published_class_names(class_names)
    return LoadedCheckpoint(model, found, fmt, arch.num_classes, class_names, pp, file_path, digest, sidecar or {},
                            note)


_RESOLUTION_IN_NAME = re.compile(r"(?:^|[_.-])(256|288|320|384|448|512)(?:$|[_.-])")


def fine_tuned_resolution(pp: Preprocessing, hf_config: dict, file_path: Path) -> Preprocessing:
    """A checkpoint fine-tuned at another size names it (official `convnext_base_22k_1k_384.pth`, timm `…_384`, a
    Hugging Face config's `image_size`): it is read at that size, resized whole (crop 1.0, as their evaluations do)."""
    from dataclasses import replace
    size = hf_config.get("image_size")
    if not isinstance(size, int):
        found = _RESOLUTION_IN_NAME.search(file_path.stem if file_path.is_file() else file_path.name)
        size = int(found.group(1)) if found else None
    if not size or size == pp.input_size:
        return pp
    return replace(pp, input_size=size, crop_pct=1.0)


# ImageNet-1k's class list, `wnid<TAB>name` in output order; calibration/imagenet.py reads and checks it for the
# data side (wnid folders). Read here with the standard library: the checkpoint code imports only torch.
IMAGENET_1K_FILE = Path(__file__).resolve().parents[2] / "calibration" / "imagenet1k_classes.tsv"
IMAGENET_22K_CLASSES = 21841  # the fb_in22k heads (official, timm, Hugging Face)


def imagenet_1k_names() -> tuple[str, ...]:
    return tuple(line.split("\t")[1] for line in IMAGENET_1K_FILE.read_text(encoding="utf-8").splitlines()[1:])


def published_class_names(names: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(class names, a note on them) for a checkpoint in a foreign layout (official, timm, Hugging Face).

    Published 1k heads name no classes (official, timm) or may carry placeholders ("LABEL_0"): they are
    ImageNet-1k's, in its index order. A 22k head keeps its indices, with a note saying so; real names (a Hugging
    Face id2label) are kept."""
    n = len(names)
    if names not in (tuple(str(i) for i in range(n)), tuple(f"LABEL_{i}" for i in range(n))):
        return names, ""
    if n == 1000:
        return imagenet_1k_names(), (f"ImageNet-1k class names ({IMAGENET_1K_FILE.name}): the checkpoint names "
                                     "no classes and a published 1,000-class head is ImageNet-1k's")
    if n == IMAGENET_22K_CLASSES:
        return names, (f"ImageNet-22k head ({n:,} classes): outputs are class indices 0..{n - 1}; no 22k class "
                       "names are carried")
    return names, ""


# ---------------------------------------------------------------- our format

def save_checkpoint(
    model: ConvNeXt,
    path: Path | str,
    *,
    variant: Variant,
    class_names: list[str] | tuple[str, ...],
    preprocessing: Preprocessing,
    recipe: dict | None = None,
    dataset: dict | None = None,
    accuracy: dict | None = None,
) -> Path:
    """Save as `<name>.safetensors` plus `<name>.json`; the sidecar is written last and names the weights' sha256."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    publish_file(path, lambda p: save_file(sd, str(p), metadata={"format": FORMAT_TAG}))
    sidecar = {
        "format": FORMAT_TAG,
        "variant": variant.name,
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        "recipe": recipe or {},
        "dataset": dataset or {},
        "accuracy": accuracy or {},
        "sha256": sha256_file(path),
    }
    publish_file(path.with_suffix(SIDECAR_SUFFIX), lambda p: p.write_text(json.dumps(sidecar, indent=2) + "\n"))
    return path
