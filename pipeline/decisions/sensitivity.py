"""Per-layer sensitivity of a target's INT8 artifact: which layers lose the accuracy, measured on a slice of
the calibration split (never the evaluation split).

The one loop, for every target: the target gives a LayerProbe (its artifact with any set of layers back in
float, and any layer's output tapped); this module measures, for each quantized layer,
- SQNR of the layer's output in the INT8 artifact against the artifact with every layer in float
  (10·log10(Σ f² / Σ (f − q)²), dB; errors accumulate along the network, as they do on the device);
- the top-1 agreement with the all-float artifact regained when only that layer is in float (pp), and how
  much cleaner the logits get (dB, continuous where agreement is already ~100 %);
then names the layers as the checkpoint does, ranks them and writes the result.

The per-layer passes are one a layer: at ConvNeXt-B and up they are the fallback's largest cost (a hundred passes of
B), so they may run under a time budget: the layers go worst SQNR first, and those left when it is spent are ranked
after the probed ones by their SQNR alone, which the result says.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.core.cache import publish_file
from convnext_deploy.pipeline.models.convnext import weight_layers


@dataclass(frozen=True)  # the default instance of `measure` is shared
class SensitivityConfig:
    threads: int = 2
    budget_s: float | None = None  # seconds for the whole measurement (None: every layer is probed)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return _db(_sum_sq(ref), _sum_sq(ref, test))


def _sum_sq(a: np.ndarray, b: np.ndarray | None = None) -> float:
    a = a.astype(np.float64)
    return float(np.sum(a * a if b is None else (a - b) ** 2))


def _db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def _logits(probe, floated: set) -> np.ndarray:
    return np.concatenate([chunk[0] for chunk in probe.run(floated, [])])


def run_probe(probe, log=print, budget_s: float | None = None) -> dict:
    """The measurement itself, on the images the probe was made with (targets.base.LayerProbe). The all-float and
    the INT8 artifact run side by side, chunk by chunk; each layer's output is reduced to its two sums
    (Σ f², Σ (f − q)²) before the next chunk, so memory is one chunk of activations whatever the image count.
    `budget_s`: no layer's own pass starts after that many seconds (the module's docstring)."""
    start = time.monotonic()
    layers = probe.layers
    signal, noise = np.zeros(len(layers)), np.zeros(len(layers))
    f_logits, q_logits = [], []
    for f_chunk, q_chunk in zip(probe.run(set(layers), layers), probe.run(set(), layers)):
        f_logits.append(f_chunk[0])
        q_logits.append(q_chunk[0])
        for i in range(len(layers)):
            signal[i] += _sum_sq(f_chunk[i + 1])
            noise[i] += _sum_sq(f_chunk[i + 1], q_chunk[i + 1])
        del f_chunk, q_chunk
    f_out, q_out = np.concatenate(f_logits), np.concatenate(q_logits)
    ref_top1 = f_out.argmax(1)
    base_agree = float((q_out.argmax(1) == ref_top1).mean())
    base_sqnr = sqnr_db(f_out, q_out)
    weights = probe.details.get("weights") or [""] * len(layers)
    rows = [{"layer": layer, "op": probe.ops[i] if probe.ops else "", "weight": weights[i],
             "sqnr_db": _db(signal[i], noise[i]), **({"module": probe.modules[i]} if probe.modules else {})}
            for i, layer in enumerate(layers)]
    probed = 0
    for i in sorted(range(len(layers)), key=lambda j: rows[j]["sqnr_db"]):  # worst first: a budget keeps the likeliest
        if budget_s is not None and time.monotonic() - start >= budget_s:
            break
        alone = _logits(probe, {layers[i]})
        row = rows[i]
        row.update(agreement_regained_pp=(float((alone.argmax(1) == ref_top1).mean()) - base_agree) * 100.0,
                   logit_sqnr_gain_db=sqnr_db(f_out, alone) - base_sqnr)
        probed += 1
        log(f"sensitivity {probed}/{len(layers)} {layers[i]}: SQNR {row['sqnr_db']:.1f} dB, float alone "
            f"{row['agreement_regained_pp']:+.2f} pp, logits {row['logit_sqnr_gain_db']:+.2f} dB")
    if probed < len(layers):
        log(f"sensitivity: {probed} of {len(layers)} layers probed alone before the time budget ran out; the other "
            f"{len(layers) - probed} (the cleaner by SQNR) are ranked after them by SQNR")
    extra = {k: v for k, v in probe.details.items() if k != "weights"}
    if probe.check is not None:
        extra.update(probe.check(f_out))
    return {"layers": rows, "images": len(f_out), "int8_agreement": base_agree, "logit_sqnr_db": base_sqnr,
            "runtime": probe.runtime, "kind": probe.kind, "probed": probed, "budget_s": budget_s,
            "seconds": round(time.monotonic() - start, 1), **extra}


def measure(target, reference, int8, images: np.ndarray, model, calibration=None,
            cfg: SensitivityConfig = SensitivityConfig(), log=print) -> dict:
    """`reference`: the float artifact `int8` was quantized from; `model`: the torch model it was built from
    (outlier-smoothed: not the checkpoint's own weights); `calibration`: what it was calibrated on. The target
    must have a layer probe."""
    start = time.monotonic()
    probe = target.layer_probe({"fp32": reference, "int8": int8}, images, cfg.threads, model=model,
                               calibration=calibration)
    budget = None if cfg.budget_s is None else max(0.0, cfg.budget_s - (time.monotonic() - start))
    result = run_probe(probe, log, budget)
    names = [n for n, _ in weight_layers(model)]
    rows = result["layers"]
    if len(rows) == len(names) and not all("module" in r for r in rows):  # network order: name as the checkpoint
        for r, n in zip(rows, names):
            r["module"] = n
    for i, r in enumerate(rows):
        r["index"] = i
        r["stage"] = _stage(r.get("module", ""))
    ranked = sorted(rows, key=rank_key)
    return {"target": target.name, "images": result["images"], "logit_sqnr_db": result["logit_sqnr_db"],
            "float_graph_max_abs_diff": result.get("float_graph_max_abs_diff"),
            "int8_agreement_with_float": result["int8_agreement"], "layers": rows,
            "ranking": [r.get("module", r["layer"]) for r in ranked], "runtime": result["runtime"],
            "kind": result["kind"], "float_reference": result.get("float_reference"),
            "rebuilt_proxy_max_abs_diff": result.get("rebuilt_proxy_max_abs_diff"), "probed": result["probed"],
            "budget_s": cfg.budget_s, "seconds": round(time.monotonic() - start, 1)}


def rank_key(r: dict):
    """Most sensitive first: how much cleaner the logits get with the layer alone in float (continuous), then the
    top-1 agreement that regains, then the layer's own SQNR. Agreement regained is a count of a handful of images
    on a small slice, too coarse to rank by first: it puts layers that flip one image above the outlier-fed layers
    that the logit gain finds. A layer the budget left unprobed ranks after every probed one, by its SQNR."""
    if "agreement_regained_pp" not in r:
        return (1, 0.0, 0.0, r["sqnr_db"])
    return (0, -r.get("logit_sqnr_gain_db", 0.0), -r["agreement_regained_pp"], r["sqnr_db"])


def _stage(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        return f"stage {parts[1]}"
    return parts[0] or "?"


def write(result: dict, out: Path) -> None:
    from convnext_deploy.reports.markdown_page import sensitivity_markdown
    from convnext_deploy.reports.plots import sensitivity_png

    out.mkdir(parents=True, exist_ok=True)
    png = sensitivity_png(result)
    if png:
        publish_file(out / "sensitivity.png", lambda p: p.write_bytes(png))
    publish_file(out / "sensitivity.md", lambda p: p.write_text(sensitivity_markdown(result)))
    publish_file(out / "sensitivity.json", lambda p: p.write_text(json.dumps(result, indent=1)))
