"""Published ConvNeXt weights by name, for users with a network. Nothing here runs in tests past `_open_url`.

Downloads go to a cache directory through a temporary file and a rename, so an interrupted download
never leaves a file that looks complete.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from convnext_deploy.pipeline.core.cache import publish_file
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.checkpoints import LoadedCheckpoint, load_checkpoint

_FB = "https://dl.fbaipublicfiles.com/convnext/"
_TIMM_RSB = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
_HF = "https://huggingface.co/{repo}/resolve/main/{file}"


@dataclass(frozen=True)
class Published:
    name: str
    variant: str
    layout: str  # official | timm | hf
    files: tuple[tuple[str, str], ...]  # (local file name, URL); the first is the weights
    note: str = ""


def _hf(name: str, variant: str, repo: str, weights: str = "pytorch_model.bin") -> Published:
    return Published(name, variant, "hf", ((weights, _HF.format(repo=repo, file=weights)),
                                           ("config.json", _HF.format(repo=repo, file="config.json"))))


PUBLISHED: dict[str, Published] = {p.name: p for p in (
    Published("convnext_tiny.fb_in1k", "t", "official", (("convnext_tiny_1k_224_ema.pth", _FB + "convnext_tiny_1k_224_ema.pth"),)),
    Published("convnext_small.fb_in1k", "s", "official", (("convnext_small_1k_224_ema.pth", _FB + "convnext_small_1k_224_ema.pth"),)),
    Published("convnext_base.fb_in1k", "b", "official", (("convnext_base_1k_224_ema.pth", _FB + "convnext_base_1k_224_ema.pth"),)),
    Published("convnext_large.fb_in1k", "l", "official", (("convnext_large_1k_224_ema.pth", _FB + "convnext_large_1k_224_ema.pth"),)),
    Published("convnext_xlarge.fb_in22k_ft_in1k", "xl", "official",
              (("convnext_xlarge_22k_1k_224_ema.pth", _FB + "convnext_xlarge_22k_1k_224_ema.pth"),),
              "ImageNet-22k pre-trained, fine-tuned on 1k"),
    Published("convnext_atto.d2_in1k", "atto", "timm", (("convnext_atto_d2-01bb0f51.pth", _TIMM_RSB + "convnext_atto_d2-01bb0f51.pth"),)),
    Published("convnext_femto.d1_in1k", "femto", "timm", (("convnext_femto_d1-d71d5b4c.pth", _TIMM_RSB + "convnext_femto_d1-d71d5b4c.pth"),)),
    Published("convnext_pico.d1_in1k", "pico", "timm", (("convnext_pico_d1-10ad7f0d.pth", _TIMM_RSB + "convnext_pico_d1-10ad7f0d.pth"),)),
    Published("convnext_nano.d1h_in1k", "nano", "timm", (("convnext_nano_d1h-7eb4bdea.pth", _TIMM_RSB + "convnext_nano_d1h-7eb4bdea.pth"),)),
    Published("timm/convnext_tiny.fb_in1k", "t", "timm",
              (("model.safetensors", _HF.format(repo="timm/convnext_tiny.fb_in1k", file="model.safetensors")),)),
    _hf("facebook/convnext-tiny-224", "t", "facebook/convnext-tiny-224"),
    _hf("facebook/convnext-small-224", "s", "facebook/convnext-small-224"),
    _hf("facebook/convnext-base-224", "b", "facebook/convnext-base-224"),
    _hf("facebook/convnext-large-224", "l", "facebook/convnext-large-224"),
)}


def cache_dir() -> Path:
    return Path(os.environ.get("CONVNEXT_DEPLOY_CACHE", Path.home() / ".cache" / "convnext-deploy"))


def _open_url(url: str):
    """The single place the network is touched."""
    import urllib.request

    return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - https URLs from the table above


def download(name: str, root: Path | None = None) -> Path:
    """Fetch a published checkpoint into the cache (once) and return the path to load."""
    if name not in PUBLISHED:
        raise UserError(f"unknown published checkpoint {name!r}; known: {', '.join(PUBLISHED)}")
    pub = PUBLISHED[name]
    target = (root or cache_dir()) / name.replace("/", "--")
    for fname, url in pub.files:
        dest = target / fname
        if dest.exists():
            continue

        def fetch(tmp: Path, url=url) -> None:
            try:
                with _open_url(url) as resp, open(tmp, "wb") as f:
                    shutil.copyfileobj(resp, f)
            except OSError as e:
                raise UserError(f"download of {url} failed ({e}); check the network or pass a local --checkpoint") from None

        publish_file(dest, fetch)
    return target if pub.layout == "hf" else target / pub.files[0][0]


def load_published(name: str, root: Path | None = None) -> LoadedCheckpoint:
    return load_checkpoint(download(name, root), PUBLISHED[name].variant if name in PUBLISHED else None)
