"""`make bench`: speed ratios measured in one run, medians of interleaved rounds.

ONNX Runtime, 224 px, batch 1, 2 threads, for atto and T:
FP32 vs our INT8 vs `quantize_static` with its default arguments (the peer), plus each one's top-1 on the
reference task where a reference checkpoint exists (a variant without one is timed with its weights as
initialised: the values do not change the cost, and no accuracy is printed for it).
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
from targets import load_target
from targets.base import CalibrationData

PEER = {"recipe": "quantize_static defaults"}


def bench_ort(variant: str, size: int, threads: int, runs: int, n_eval: int | None, log=print) -> dict:
    ort_cpu = load_target("onnxruntime")
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
    arts = build_artifacts("onnxruntime", export.path, model, calibration, ("fp32", "int8"), {}, log)
    arts["int8_peer"] = build_artifacts("onnxruntime", export.path, model, calibration, ("int8",), PEER, log)["int8"]
    runners = {k: ort_cpu.load_runner(a, threads) for k, a in arts.items()}
    lat = measure({k: r.run for k, r in runners.items()}, batch=1, input_size=size, runs=runs, warmup=10, rounds=10)
    row = {"variant": variant, "weights": weights, "input_size": size, "threads": threads, "batch": 1,
           "device": device_label(threads), "runtime": runners["fp32"].runtime,
           "p50_ms": {k: v.p50_ms for k, v in lat.items()},
           "int8_ops": {k: arts[k].metadata["ops"]["integer_kernels"] for k in ("int8", "int8_peer")},
           "float_conv_matmul_left": {k: arts[k].metadata["ops"]["float_conv_matmul_left"] for k in ("int8", "int8_peer")}}
    if ref.exists():
        preds = predict_many({k: r.run for k, r in runners.items()},
                             iter_batches(test, split.evaluation.indices, pp, batch_size=200, desc="evaluation"))
        row["top1"] = {k: accuracy(p)["top1"] for k, p in preds.items()}
        row["agreement_vs_fp32"] = {k: accuracy(preds[k], preds["fp32"])["agreement"] for k in ("int8", "int8_peer")}
        row["eval"] = {"split": test.name, "n": len(split.evaluation), "input_size": pp.input_size}
    return row


def print_table(rows: list[dict]) -> None:
    print()
    print(f"ONNX Runtime, batch 1, p50 of interleaved rounds; {rows[0]['device']}; {rows[0]['runtime']}")
    print(f"{'variant':8} {'px':>4} {'FP32 ms':>9} {'INT8 ms':>9} {'peer ms':>9} {'INT8/FP32':>10} "
          f"{'ours/peer':>10}  {'top-1 FP32 / INT8 / peer (reference task, 32 px)':<50}")
    for r in rows:
        p = r["p50_ms"]
        acc = ("not measured: " + r["weights"]) if "top1" not in r else \
            " / ".join(f"{r['top1'][k] * 100:.2f}%" for k in ("fp32", "int8", "int8_peer")) + \
            f"  (drop {(r['top1']['fp32'] - r['top1']['int8']) * 100:+.2f} pp ours, " \
            f"{(r['top1']['fp32'] - r['top1']['int8_peer']) * 100:+.2f} pp peer; n={r['eval']['n']})"
        print(f"{r['variant']:8} {r['input_size']:>4} {p['fp32']:>9.2f} {p['int8']:>9.2f} {p['int8_peer']:>9.2f} "
              f"{p['fp32'] / p['int8']:>9.2f}× {p['int8_peer'] / p['int8']:>9.2f}×  {acc}")
    print("INT8/FP32 = FP32 p50 / INT8 p50 (speed-up); ours/peer = peer p50 / our INT8 p50.")
    print("Ours: Conv/MatMul/Gemm only, uint8 activations, int8 per-channel weights (QLinearConv/QLinearMatMul).")
    print("Peer: quantize_static(model, output, reader) with its defaults: QDQ int8 on every op, per-tensor.")
    for r in rows:
        print(f"  {r['variant']}: integer kernels ours {r['int8_ops']['int8']}, peer {r['int8_ops']['int8_peer']}; "
              f"float Conv/MatMul left ours {r['float_conv_matmul_left']['int8']}, peer {r['float_conv_matmul_left']['int8_peer']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    ap.add_argument("--variants", default="atto,t")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--eval", type=int, default=None)
    ap.add_argument("--out", default="runs/bench/bench.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench_ort(v, args.image_size, args.threads, args.runs, args.eval) for v in args.variants.split(",")]
    print_table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
