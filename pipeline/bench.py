"""`make bench`: speed ratios measured in one run, medians of interleaved rounds.

Per target, at 224 px, batch 1, 2 threads, for atto and T: FP32, the target's other float precision,
our INT8 and the peer's default INT8 are timed in one interleaved measurement, so their ratios are honest.
Each one's top-1 on the reference task is printed where a reference checkpoint exists; a variant without one
is timed with its weights as initialised (the values do not change the cost) and no accuracy is printed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from calibration.batches import iter_batches, load_array
from calibration.fashion_mnist import FashionMNIST
from calibration.split import make_split
from pipeline.cache import key_of
from pipeline.checkpoints import load_checkpoint
from pipeline.deploy import build_artifacts
from pipeline.export import export_cached
from pipeline.latency import measure
from pipeline.machine import device_label
from pipeline.model import create_model
from pipeline.reference import reference_path
from pipeline.train import dataset_preprocessing
from pipeline.validate import accuracy, predict_many
from targets import TARGETS, load_target
from targets.base import CalibrationData

# target → [(row label, precision, build options)]; the first row is the FP32 baseline, the INT8 "ours" row
# is named "int8", and ratios are printed against the rows named in RATIOS.
ROWS = {
    "onnxruntime": [("fp32", "fp32", {}), ("int8", "int8", {}),
                    ("int8 quantize_static defaults", "int8", {"recipe": "quantize_static defaults"})],
    "openvino": [("fp32", "fp32", {}), ("bf16", "bf16", {}), ("int8", "int8", {}),
                 ("int8 nncf.quantize defaults", "int8", {"recipe": "nncf.quantize defaults"})],
}
RATIOS = {"onnxruntime": [("int8", "fp32"), ("int8", "int8 quantize_static defaults")],
          "openvino": [("int8", "fp32"), ("int8", "bf16"), ("int8", "int8 nncf.quantize defaults")]}


def bench(target: str, variant: str, size: int, threads: int, runs: int, n_eval: int | None, log=print) -> dict:
    module = load_target(target)
    train, test = FashionMNIST("train"), FashionMNIST("test")
    ref = reference_path(variant)
    if ref.exists():
        ck = load_checkpoint(ref, variant)
        model, sha, pp, weights = ck.model, ck.sha256, ck.preprocessing, f"reference {ref}"
    else:
        torch.manual_seed(0)
        model = create_model(variant, num_classes=10).eval()
        pp, sha, weights = dataset_preprocessing(train, 32), key_of("init", variant), "as initialised (no reference checkpoint)"
    split = make_split(train, test, 500, n_eval, seed=0)
    calib_x, _ = load_array(train, split.calibration.indices, pp, desc="calibration")
    calibration = CalibrationData(calib_x, split.calibration.ids_sha256, train.name)
    export = export_cached(model, sha, variant, calib_x[:16])
    arts = {label: build_artifacts(target, export.path, model, calibration, (prec,), opts, log)[prec]
            for label, prec, opts in ROWS[target]}
    runners = {k: module.load_runner(a, threads) for k, a in arts.items()}
    lat = measure({k: r.run for k, r in runners.items()}, batch=1, input_size=size, runs=runs, warmup=10, rounds=10)
    row = {"target": target, "variant": variant, "weights": weights, "input_size": size, "threads": threads,
           "batch": 1, "device": device_label(threads), "runtime": runners["fp32"].runtime,
           "p50_ms": {k: v.p50_ms for k, v in lat.items()},
           "executed": {k: r.precision for k, r in runners.items()},
           "ratios": {f"{a} vs {b}": lat[b].p50_ms / lat[a].p50_ms for a, b in RATIOS[target]}}
    if ref.exists():
        preds = predict_many({k: r.run for k, r in runners.items()},
                             iter_batches(test, split.evaluation.indices, pp, batch_size=200, desc="evaluation"))
        row["top1"] = {k: accuracy(p)["top1"] for k, p in preds.items()}
        row["eval"] = {"split": test.name, "n": len(split.evaluation), "input_size": pp.input_size}
    return row


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"\n{r['target']} · {r['variant']} · {r['input_size']} px · batch 1 · {r['device']} · {r['runtime']}")
        acc_note = (f"top-1 on {r['eval']['split']} ({r['eval']['n']} images, {r['eval']['input_size']} px)"
                    if "top1" in r else f"top-1 not measured: weights {r['weights']}")
        print(f"  {'':34} {'p50 ms':>8}  {acc_note}")
        for k, ms in r["p50_ms"].items():
            acc = f"{r['top1'][k] * 100:.2f}%" if "top1" in r else "—"
            print(f"  {k:34} {ms:>8.2f}  {acc}")
        for name, ratio in r["ratios"].items():
            print(f"  speed-up {name}: {ratio:.2f}×")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    ap.add_argument("--targets", default=",".join(t for t in ROWS if t in TARGETS))
    ap.add_argument("--variants", default="atto,t")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--eval", type=int, default=None)
    ap.add_argument("--out", default="runs/bench/bench.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for target in args.targets.split(","):
        if not load_target(target).available().ok:
            print(f"{target}: skipped ({load_target(target).available().reason})")
            continue
        for v in args.variants.split(","):
            rows.append(bench(target, v, args.image_size, args.threads, args.runs, args.eval))
    print_rows(rows)
    print("\nspeed-up A vs B = p50(B) / p50(A), from one interleaved measurement per target and variant.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
