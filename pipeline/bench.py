"""`make bench`: speed ratios measured in one run, medians of interleaved rounds, on the CPU it runs on.

Per target, at 224 px, batch 1, 2 threads: the reference precision, the target's other float precisions the CPU
runs natively (BF16 without AVX-512 BF16 or AMX is emulated and skipped, with the reason), and every INT8 candidate
the target declares (ours, ours without outlier smoothing, the peer's default and the other settings: what
`--recipe auto` chooses among) are timed in one interleaved measurement, so their ratios are honest; each row's
top-1 drop is against the first row on the same images. Proxy targets (TensorRT, Core ML off their device) give
accuracy only. The CPU's INT8 and BF16 paths head the output: every ratio belongs to that CPU.

Two modes (pipeline/measure/bench_rows.py): the default is bounded to end within minutes on two cores (ONNX Runtime and
OpenVINO, atto and T, a deadline the timing is cut to, scaled to this CPU: bench_deadline.py); `--full` is the whole
grid (every target, atto+outliers too, longer timing per row, the whole test split). A progress line ends each row.
The result goes to benchmarks/<cpu>-<date>/bench.json (bench-full.json for --full) with the date, the CPU's
identity and ISA, and the library versions; `make benchmarks` turns those files into BENCHMARKS.md.
Each one's top-1 on the reference task is printed where a reference checkpoint exists; a variant without one
is timed with its weights as initialised (the values do not change the cost) and no accuracy is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from convnext_deploy.calibration.batches import iter_batches
from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.measure.accuracy import accuracy, predict_many
from convnext_deploy.pipeline.measure.bench_deadline import deadline
from convnext_deploy.pipeline.measure.bench_rows import (
    BOUNDED,
    FORMAT,
    FULL,
    Clock,
    bench_checkpoint,
    default_out,
    distance_and_streams,
    machine_record,
    print_rows,
    progress,
    versions,
)
from convnext_deploy.pipeline.measure.latency import Budget, measure, ratio
from convnext_deploy.pipeline.measure.machine import cpu_profile, device_label, profile_line
from convnext_deploy.pipeline.measure.memory import stage_peak
from convnext_deploy.pipeline.stages.build import build, build_one, spread
from convnext_deploy.pipeline.stages.context import DEFAULT, DeployConfig
from convnext_deploy.pipeline.stages.export import export, formed
from convnext_deploy.pipeline.stages.prepare import prepare
from convnext_deploy.targets import TARGETS, get_target
from convnext_deploy.targets.base import Artifact, BuildRequest, inference_batch

TOLERANCE = 0.03  # rounds go on (within --budget) until every ratio's 95 % interval is within ±3 %
INSTANCES = 4  # at least this many loads of every artifact per row: intervals carry the spread between loads


def bench(target: str, variant: str, size: int, threads: int, runs: int, n_eval: int | None, budget_s,
          log=print) -> dict:
    """One row. `budget_s`: seconds of timing (rounds go on until every ratio is resolved or it ends), or a
    function giving them when the timing starts (the bounded mode's share of what is left)."""
    ck, weights, has_reference = bench_checkpoint(variant)
    cfg = DeployConfig(target=target, variant=ck.variant.name, n_calib=500, n_eval=n_eval, image_size=size,
                       threads=threads, fallback=False)
    ctx = prepare(cfg, log, checkpoint=ck, decisions=False)  # the deploy's own split, calibration, sources, builds
    sources = export(ctx)
    built = build(ctx, sources)
    runners = {p: r for p, r in built.runners.items() if p != "int8"}
    floats = _float_forms(ctx, sources)  # the reference in every other graph form a recipe starts from
    runners.update({label: ctx.target.load_runner(a, threads) for label, a in floats.items()})
    runners.update({f"int8 {name}": r.runner for name, r in built.recipes.items()})
    peers = _user_paths(ctx, sources.plain.onnx_path, log) if "int8" in built.artifacts else {}
    runners.update({label: ctx.target.load_runner(a, threads) for label, a in peers.items()})
    timed = {k: r for k, r in runners.items() if r.timed}
    loads = spread(ctx, {**{p: built.artifacts[p] for p in runners if p in built.artifacts}, **floats,
                         **{f"int8 {name}": r.artifact for name, r in built.recipes.items()}, **peers}, INSTANCES)
    seconds, t0 = (budget_s() if callable(budget_s) else budget_s), time.monotonic()
    lat = measure(timed, batch=1, input_size=size, runs=runs, warmup=10, rounds=3 * INSTANCES,
                  budget=Budget(seconds, TOLERANCE), spread=loads) if timed else {}
    timing = {"budget_s": round(seconds, 1), "seconds": round(time.monotonic() - t0, 1)}
    first, any_lat = next(iter(runners)), next(iter(lat.values()), None)  # one measurement: the same rounds for all
    ratios = {f"{k} vs {first}": ratio(lat[first], lat[k], TOLERANCE).to_dict() for k in lat if k != first}
    refs = [k for k in (ctx.target.reference, *floats) if k in lat]
    if len(refs) > 1 and f"int8 {DEFAULT}" in lat:  # INT8 against the fastest float form, not only the default one
        fastest = min(refs, key=lambda k: lat[k].p50_ms)
        ratios[f"int8 {DEFAULT} vs the fastest {ctx.target.reference} form ({fastest})"] = ratio(
            lat[fastest], lat[f"int8 {DEFAULT}"], TOLERANCE).to_dict()
    peer = f"int8 {ctx.target.peer_default}"
    for other in (peer, *peers):  # ours against the peer's default recipe on our ONNX and its users' own paths
        if other in lat and f"int8 {DEFAULT}" in lat:
            ratios[f"int8 {DEFAULT} vs {other}"] = ratio(lat[other], lat[f"int8 {DEFAULT}"], TOLERANCE).to_dict()
    row = {"target": target, "variant": variant, "weights": weights, "input_size": size, "threads": threads,
           "batch": 1, "device": device_label(threads), "cpu_profile": cpu_profile(), "runtime": runners[first].runtime,
           "kind": "proxy" if runners[first].proxy else "real",
           "p50_ms": {k: (lat[k].p50_ms if k in lat else None) for k in runners},
           "p50_ci_ms": {k: lat[k].p50_ci_ms for k in lat},
           **{k: getattr(any_lat, k) if any_lat else 0 for k in ("rounds", "instances", "disturbed_rounds")},
           "executed": {k: r.precision for k, r in runners.items()}, "ratios": ratios, "skipped": list(ctx.notes),
           "timing": timing}
    if lat:
        arts = {ctx.target.reference: built.artifacts[ctx.target.reference],
                **({f"int8 {DEFAULT}": built.recipes[DEFAULT].artifact} if built.recipes else {})}
        row.update(distance_and_streams(ctx.target, ctx.ck.model, runners, arts, lat, size, threads, log))
    if has_reference:
        preds = predict_many({k: r.run for k, r in runners.items()},
                             iter_batches(ctx.eval_src, ctx.split.evaluation.indices, ck.preprocessing,
                                          batch_size=inference_batch(ck.preprocessing.input_size, 200),
                                          desc="evaluation"))
        row["top1"] = {k: accuracy(p)["top1"] for k, p in preds.items()}
        row["drop_pp"] = {k: accuracy(p, preds[first])["top1_drop_pp"] for k, p in preds.items()}
        row["eval"] = {"split": ctx.eval_src.name, "n": len(ctx.split.evaluation), "input_size": ck.preprocessing.input_size}
    return row


def _float_forms(ctx, sources) -> dict:
    """label → the reference precision built from each other graph form the target's recipes start from."""
    ref, forms = ctx.target.reference, {r.form for r in ctx.target.int8_recipes} - {sources.plain.form, None}
    if sources.plain.onnx_path is None:
        return {}
    return {f"{ref} {form}": build_one(ctx, formed(ctx, sources.plain, form), ref, ctx.options) for form in sorted(forms)}


def _user_paths(ctx, onnx_path: Path | None, log) -> dict:
    """The target's users' own INT8 paths (Target.user_paths) from the checkpoint's torch module or its FP32 export
    (`onnx_path`), on the row's calibration images, built once per checkpoint, images, toolchain and code
    (label → artifact)."""
    make = ctx.target.user_paths
    if make is None:
        return {}
    key = key_of("user-paths", ctx.target.name, ctx.ck.sha256, ctx.calibration.manifest_sha256,
                 ctx.target.describe_environment(), code_digest(make.__module__))

    def build_into(tmp: Path) -> None:
        arts = make(BuildRequest("int8", onnx_path, ctx.ck.model, tmp, ctx.calibration))
        (tmp / "paths.json").write_text(json.dumps({k: {"files": [f.name for f in a.files], "metadata": a.metadata}
                                                    for k, a in arts.items()}))

    where, was_cached = cached_dir("user-paths", key, build_into, log)
    log(f"{ctx.target.name} users' own INT8 paths: {'cached' if was_cached else 'built'} ({where})")
    index = json.loads((where / "paths.json").read_text())
    return {k: Artifact(ctx.target.name, "int8", [where / f for f in v["files"]], v["metadata"]) for k, v in index.items()}


STUDY = (("alternate every call", 1, False), ("alternate every call, 1 re-warm call", 1, True),
         ("blocks of 10, 1 re-warm call", 10, True), ("blocks of 50, 1 re-warm call", 50, True))


def interleave_study(target: str, variant: str, size: int, threads: int, cycles: int = 8, calls: int = 50,
                     log=print) -> list[dict]:
    """What interleaving granularity and cache warmth do to the figures: the reference and the default INT8
    artifact timed (a) alternating on every call, (b) alternating on every call after one untimed re-warm call,
    (c) in blocks of 10 after one re-warm call (the harness's way), (d) in blocks of 50. The four ways take turns,
    `calls` timed calls each per cycle, so a disturbed stretch of the machine (pipeline/measure/latency.py) hits
    them alike, and the disturbed ones are left out as the harness does."""
    from convnext_deploy.pipeline.measure.latency import _seconds_of, undisturbed

    ck, _, _ = bench_checkpoint(variant)
    cfg = DeployConfig(target=target, variant=ck.variant.name, n_calib=100, n_eval=200, image_size=size,
                       threads=threads, fallback=False, alternatives=False)
    ctx = prepare(cfg, log, checkpoint=ck, decisions=False)
    built = build(ctx, export(ctx))
    ref = ctx.target.reference
    x = torch.randn(1, 3, size, size).numpy()
    timers = {k: _seconds_of(built.runners[k]) for k in (ref, "int8")}
    for t in timers.values():
        for _ in range(10):
            t(x)
    times: dict[tuple, list[list[float]]] = {(label, k): [] for label, _, _ in STUDY for k in timers}
    for _ in range(cycles):
        for label, block, rewarm in STUDY:
            chunk: dict[str, list[float]] = {k: [] for k in timers}
            while len(chunk["int8"]) < calls:
                for k, t in timers.items():
                    if rewarm:
                        t(x)
                    chunk[k] += [t(x) * 1e3 for _ in range(block)]
            for k in timers:
                times[(label, k)].append(chunk[k][:calls])
    keep = undisturbed(times)
    log(f"{cycles} cycles of {calls} timed calls per runner and way; {int((~keep).sum())} left out (disturbed "
        "machine)")
    rows = []
    for label, _, _ in STUDY:
        p50 = {k: float(np.median(np.asarray(times[(label, k)])[keep])) for k in timers}
        rows.append({"interleaving": label, "p50_ms": p50, "speedup": p50[ref] / p50["int8"],
                     "cycles": int(keep.sum())})
        log(f"{label:40} {ref} {p50[ref]:7.2f} ms  int8 {p50['int8']:7.2f} ms  {rows[-1]['speedup']:.2f}×")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convnext_deploy.pipeline.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="the whole grid: every target, atto,t,atto+outliers, 200 runs, 240 s of timing a row, the "
                         "whole test split, no deadline (options given still apply)")
    ap.add_argument("--targets", help=f"comma-separated (default {BOUNDED['targets']}; --full: all)")
    ap.add_argument("--variants", help=f"comma-separated (default {BOUNDED['variants']}; --full: {FULL['variants']}); "
                                       "VARIANT+outliers injects 30x norm-channel outliers (same FP32 function)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, help=f"timed calls per runner before the budget's extra rounds "
                                             f"(default {BOUNDED['runs']}; --full: {FULL['runs']})")
    ap.add_argument("--eval", type=int, help=f"test images for top-1 (default {BOUNDED['eval']}; --full: all)")
    ap.add_argument("--budget", type=float,
                    help="at most this many seconds of interleaved rounds per row, until every ratio's 95%% interval "
                         f"is within ±{TOLERANCE * 100:.0f}%% (default {BOUNDED['budget']:g}; --full: {FULL['budget']:g})")
    ap.add_argument("--minutes", type=float,
                    help=f"end the run within about this many minutes: the rows' timing shares are cut to it; 0: no "
                         f"bound (default {BOUNDED['minutes']:g}, scaled to this CPU's speed; --full: none)")
    ap.add_argument("--out", help="result JSON (default benchmarks/<cpu>-<date>/bench.json; --full: bench-full.json)")
    ap.add_argument("--interleave-study", action="store_true",
                    help="instead: time the reference and INT8 of each target and variant at four interleaving granularities")
    ap.add_argument("--device", metavar="NAME",
                    help="the device profile the figures are for (pipeline/device/profiles.py); only one whose INT8 "
                         "path this machine takes: speed under emulation means nothing")
    args = ap.parse_args(argv)
    device = _device(args.device)
    if device is False:
        return 2
    mode = FULL if args.full else BOUNDED
    given = [k for k in mode if getattr(args, k) is not None]
    for key, value in mode.items():
        if getattr(args, key) is None:
            setattr(args, key, value if key != "targets" or value else ",".join(TARGETS))
    torch.set_num_threads(args.threads)
    print(profile_line(), flush=True)
    if args.interleave_study:
        for target in args.targets.split(","):
            for v in args.variants.split(","):
                print(f"\n{target} · {v} · {args.image_size} px · batch 1 · {args.threads} threads")
                interleave_study(target, v, args.image_size, args.threads)
        return 0
    plan, environments = [], {}
    for target in args.targets.split(","):
        avail = get_target(target).available()
        if not avail.ok and not avail.proxy:
            print(f"{target}: skipped ({avail.reason})", flush=True)
            continue
        environments[target] = get_target(target).describe_environment() if avail.ok else {}
        plan += [(target, v) for v in args.variants.split(",")]
    bound = deadline(args.minutes, given, [t for t, env in environments.items() if env], args.threads, args.image_size)
    args.minutes, clock = bound["minutes"], Clock(len(plan), bound["minutes"], args.budget)
    print(f"plan: {clock.estimate()}; {bound['note']}", flush=True)
    rows = []
    for i, (target, v) in enumerate(plan):
        print(f"[{i + 1}/{len(plan)}] {target} · {v}: building and timing", flush=True)
        memory: list[dict] = []
        t0 = time.monotonic()
        with stage_peak(f"{target} {v}", memory):
            row = bench(target, v, args.image_size, args.threads, args.runs, args.eval,
                        lambda i=i: clock.share(i, [w for _, w in plan[i + 1:]]),
                        log=lambda message: print(message, flush=True))
        seconds = time.monotonic() - t0
        clock.fixed[v] = max(clock.fixed.get(v, 0.0), seconds - row["timing"]["seconds"])
        rows.append({**row, "peak_rss_mib": memory[0]["peak_rss_mib"]})
        print(progress(i + 1, clock, row, seconds), flush=True)
    print_rows(rows)
    print("\nspeed-up A vs B = p50(B) / p50(A), from one interleaved measurement per target and variant; [low, high]: "
          "95 % bootstrap interval over the loads of the artifacts and the paired rounds within each.")
    today, machine = date.today().isoformat(), machine_record(args.threads)
    out = Path(args.out or default_out(machine, today, args.full))
    result = {"format": FORMAT, "date": today, "mode": ("full" if args.full else "default") + (" with " + ", ".join(f"--{k}" for k in given) if given else ""),
              "command": " ".join(["python -m convnext_deploy.pipeline.bench", *(sys.argv[1:] if argv is None else argv)]),
              **({"device": {"name": device.name, "description": device.description, "measured": "native"}}
                 if device else {}),
              "minutes": round(clock.elapsed() / 60, 1), "machine": machine, "versions": versions(environments),
              "settings": {**{k: getattr(args, k) for k in ("targets", "variants", "image_size", "threads", "runs",
                                                            "eval", "budget", "minutes")}, "deadline": bound},
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out} ({clock.elapsed() / 60:.1f} minutes); `make benchmarks` renders it into BENCHMARKS.md")
    return 0


def _device(name: str | None):
    """The --device profile (None: this machine), or False after one line saying why it cannot be timed here."""
    from convnext_deploy.pipeline.device.profiles import PROFILES, is_native

    if name is None:
        return None
    if name not in PROFILES:
        print(f"bench: error: unknown --device {name!r}; choose one of: {', '.join(PROFILES)}", file=sys.stderr)
        return False
    profile = PROFILES[name]
    if not is_native(profile):
        print(f"bench: error: --device {name} ({profile.description}) is not this machine's INT8 path, and speed "
              "under emulation means nothing: run `make bench` on that device (deploy --device measures its "
              "numerics here)", file=sys.stderr)
        return False
    print(f"device: {profile.label()}: this machine takes its INT8 path; the figures are measured here", flush=True)
    return profile


if __name__ == "__main__":
    raise SystemExit(main())
