"""Per-layer sensitivity of a target's INT8 artifact: which layers lose the accuracy, measured on a slice of
the calibration split (never the evaluation split). The target does the measuring (`sensitivity()` in its
module, where its runtime is); this stage picks the data, names the layers as the checkpoint does, ranks
them and writes the result."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from calibration.batches import load_array
from pipeline.checkpoints import LoadedCheckpoint
from pipeline.model import weight_layers


@dataclass
class SensitivityConfig:
    n_images: int = 256  # the first images of the calibration split
    threads: int = 2


def supported(module) -> bool:
    return callable(getattr(module, "sensitivity", None))


def measure(module, target: str, ck: LoadedCheckpoint, reference, int8, calib_src, calib_indices,
            cfg: SensitivityConfig, log=print, model=None, calibration=None) -> dict:
    """`reference`: the float artifact (or export) `int8` was quantized from; `model`: the torch model it was
    built from (outlier-smoothed: not the checkpoint's own weights); `calibration`: what it was calibrated on.
    The target must be `supported`."""
    model = model if model is not None else ck.model
    images, _ = load_array(calib_src, list(calib_indices)[:cfg.n_images], ck.preprocessing, desc="sensitivity slice")
    result = module.sensitivity({"fp32": reference, "int8": int8}, images, cfg.threads, log,
                                model=model, calibration=calibration)
    names = [n for n, _ in weight_layers(model)]
    rows = result["layers"]
    if len(rows) == len(names) and not all("module" in r for r in rows):  # network order: name as the checkpoint
        for r, n in zip(rows, names):
            r["module"] = n
    for i, r in enumerate(rows):
        r["index"] = i
        r["stage"] = _stage(r.get("module", ""))
    ranked = sorted(rows, key=rank_key)
    return {"target": target, "images": result["images"], "logit_sqnr_db": result.get("logit_sqnr_db"),
            "float_graph_max_abs_diff": result.get("float_graph_max_abs_diff"), "source": calib_src.name if hasattr(calib_src, "name") else "",
            "int8_agreement_with_float": result["int8_agreement"], "layers": rows,
            "ranking": [r.get("module", r["layer"]) for r in ranked], "runtime": result.get("runtime", ""),
            "kind": result.get("kind", "real"), "float_reference": result.get("float_reference"),
            "rebuilt_proxy_max_abs_diff": result.get("rebuilt_proxy_max_abs_diff")}


def rank_key(r: dict):
    """Most sensitive first: top-1 agreement regained when left in float alone, then how much cleaner the logits
    get (continuous, so ties at 100 % agreement still rank), then the layer's own SQNR."""
    return (-r["agreement_regained_pp"], -r.get("logit_sqnr_gain_db", 0.0), r["sqnr_db"])


def _stage(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        return f"stage {parts[1]}"
    return parts[0] or "?"


def write(result: dict, out: Path) -> None:
    from reports.render import sensitivity_markdown, sensitivity_png

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sensitivity.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    png = sensitivity_png(result)
    if png:
        (out / "sensitivity.png").write_bytes(png)
    (out / "sensitivity.md").write_text(sensitivity_markdown(result))
    tmp.replace(out / "sensitivity.json")
