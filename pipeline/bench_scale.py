"""`make bench-scale`: every variant, T to XL, deployed as a team with its own checkpoint deploys it, one row each.

A row is one `convnext-deploy deploy` of its own (a process, so its memory is its own process tree's) with the
settings the issue of record names: `--calib 100 --eval 200`, the defaults otherwise, from a checkpoint in the
official `.pth` layout with a 1,000-class head (pipeline.models.stand_in: no weights can be downloaded here) on
Fashion-MNIST written as ImageNet-style folders (calibration.user_tree). A row gives the variant's parameters and
GMACs at 224 px, each stage's seconds and process-tree peak against the memory goal (3 GiB + 4 × the FP32 weight
bytes), FP32 and INT8 p50 with the ratio and its interval, the exit code and the plan it printed first. A row this
machine cannot run says why: the deploy's own estimate (`--plan-only`) over the memory here, or over the minutes
left to the run. The result goes to benchmarks/<cpu>-<date>/scale-<target>.json; BENCHMARKS.md shows it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from convnext_deploy.pipeline.core.cache import cache_root
from convnext_deploy.pipeline.measure.bench_rows import machine_record, slug

FORMAT = "convnext-deploy scale 1"
VARIANTS = ("t", "s", "b", "l", "xl")
SETTINGS = ["--calib", "100", "--eval", "200"]
GIB = 1 << 30


def goal_bytes(weight_bytes: int) -> int:
    return 3 * GIB + 4 * weight_bytes


def _checkpoint(variant: str, work: Path, size: int = 224) -> Path:
    """The stand-in checkpoint in the official layout, made once (in a child: its weights leave with it). Its name
    gives its resolution, as the official fine-tuned ones do (`convnext_base_22k_1k_384.pth`): the deploy reads and
    calibrates it at that size."""
    from convnext_deploy.pipeline.core.forked import in_child

    path = work / f"convnext_{variant}_1k_{size}.pth"
    if not path.exists():
        in_child(_write_checkpoint, variant, path, what=f"the {variant} stand-in checkpoint")
    return path


def _write_checkpoint(variant: str, path: Path) -> None:
    import torch

    from convnext_deploy.calibration.fashion_mnist import FashionMNIST
    from convnext_deploy.calibration.imagenet import imagenet_1k
    from convnext_deploy.calibration.preprocess import preprocess
    from convnext_deploy.calibration.user_tree import WNIDS, photo
    from convnext_deploy.pipeline.models.checkpoint_layouts import to_official
    from convnext_deploy.pipeline.models.checkpoints import fine_tuned_resolution
    from convnext_deploy.pipeline.models.stand_in import stand_in
    from convnext_deploy.pipeline.models.variants import get_variant

    pp, train = fine_tuned_resolution(get_variant(variant).preprocessing, {}, path), FashionMNIST("train")
    picked = [i for k in range(10) for i in [j for j in range(20000, 22000) if train.label(j) == k][:10]]
    x = torch.stack([torch.from_numpy(preprocess(photo(train.images[i]), pp)) for i in picked])
    y = torch.tensor([train.label(i) for i in picked])
    model = stand_in(variant, x, y, [imagenet_1k().index[w] for w in WNIDS])
    tmp = path.with_suffix(".tmp")
    torch.save({"model": to_official(model.state_dict())}, tmp)
    os.replace(tmp, path)


def _suffix(size: int) -> str:
    return "" if size == 224 else f"-{size}"


def _size_flag(size: int) -> list[str]:
    return [] if size == 224 else ["--image-size", str(size)]


def _deploy(args: list[str], log: Path) -> int:
    """The deploy's output, each line with the seconds since it started: where a stage's time went."""
    t0 = time.monotonic()
    with log.open("w") as out, subprocess.Popen([sys.executable, "-m", "convnext_deploy", "deploy", *args], text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            out.write(f"[{time.monotonic() - t0:7.1f} s] {line}")
            out.flush()
    return proc.returncode


def _row(variant: str, target: str, work: Path, data: tuple[Path, Path], minutes_left: float, size: int) -> dict:
    (calib, evals), name = data, f"{variant}-{target}" + _suffix(size)
    row = _head(variant)
    ck = _checkpoint(variant, work, size)
    base = ["--target", target, "--variant", variant, "--checkpoint", str(ck), *SETTINGS, *_size_flag(size),
            "--calib-data", str(calib), "--eval-data", str(evals)]
    plan_log = work / f"{name}-plan.log"
    code = _deploy([*base, "--plan-only"], plan_log)
    lines = [line.split("] ", 1)[1] for line in plan_log.read_text().splitlines()]
    if code != 0:
        row["not_run"] = f"the deploy's estimate: {lines[-1] if lines else 'no output'}"
        return row
    row["plan"] = json.loads(lines[-1])
    if row["plan"]["seconds"] / 60 > minutes_left:
        row["not_run"] = (f"its estimate is {row['plan']['seconds'] / 60:.0f} min, more than the {minutes_left:.0f} "
                          "min left to this run (--minutes): run `make bench-scale VARIANTS=" + variant + "`")
        return row
    out = work / f"run-{name}"
    t0 = time.monotonic()
    row["exit_code"] = _deploy([*base, "--out", str(out)], work / f"{name}.log")
    row["wall_s"] = round(time.monotonic() - t0, 1)
    report_file = out / "report.json"
    if not report_file.exists():
        tail = (work / f"{name}.log").read_text().splitlines()[-1:]
        row["not_run"] = (f"the deploy stopped (exit {row['exit_code']}): "
                          + (tail[0].split("] ", 1)[-1] if tail else "no output"))
        return row
    row.update(_figures(json.loads(report_file.read_text())))
    return row


def _figures(report: dict) -> dict:
    """A row's figures from the deploy's report; a target whose latency this machine cannot measure (TensorRT
    without a GPU, Core ML off macOS) has none, and its row says what it built and how its accuracy was measured."""
    mem = report["memory"]
    lat = [r for r in report["latency"] if r["batch"] == 1 and r["role"] == "deployment"]
    fp32 = next((r for r in lat if r["precision"] == "fp32"), None)
    int8 = next((r for r in lat if r["precision"] == "int8"), None)
    speed = (int8 or {}).get("speedup_vs_reference") or {}
    timed = {"fp32_p50_ms": fp32["p50_ms"], "fp32_p50_ci_ms": fp32["p50_ci_ms"], "int8_p50_ms": int8["p50_ms"],
             "int8_p50_ci_ms": int8["p50_ci_ms"], "ratio": speed["value"], "ratio_ci95": speed["ci95"],
             "input_size": int8["input_size"]} if fp32 and int8 and speed else {
        "latency": "not measured here: " + "; ".join(n for n in report.get("notes", []) if "latency" in n.lower())[:300]}
    acc = report["accuracy"].get("int8") or {}
    return {"gmacs_224": round(int8["mac_rate"]["macs"] / 1e9, 2) if int8 and int8.get("mac_rate") else None,
            "stages": [{"stage": r["stage"], "seconds": r["seconds"], "peak_mib": r.get("tree_peak_rss_mib",
                                                                                         r["peak_rss_mib"])}
                       for r in mem["stages"]],
            "peak_mib": mem.get("tree_peak_rss_mib", mem["peak_rss_mib"]), "seconds": mem["seconds"], **timed,
            "artifacts": [{"precision": a["precision"], "files": a["files"], "size_bytes": a["size_bytes"],
                           "proxy": a.get("proxy")} for a in report["artifacts"]],
            "int8_accuracy": {k: acc.get(k) for k in ("top1_drop_pp", "agreement", "n", "kind", "proxy")},
            "gates_passed": report["gates"]["passed"],
            "recipe": (report.get("recipe_choice") or {}).get("chosen"),
            "screened": bool(report.get("recipe_screen")), "decide_steps_s": report.get("decide_steps_s")}


def _head(variant: str) -> dict:
    """What a row says of its variant before anything runs: name, parameters, the memory goal."""
    from convnext_deploy.pipeline.models.variants import get_variant

    v = get_variant(variant)
    return {"variant": variant, "name": v.long_name, "params": v.params_1k, "gmacs_224": None,
            "goal_mib": round(goal_bytes(4 * v.params_1k) / (1 << 20))}


def with_unrun(rows: list[dict], target: str, size: int) -> list[dict]:
    """`rows` in the table's order, with a row saying so for each variant T…XL not run yet at 224 px (the table
    names every variant; a run of that variant replaces it)."""
    have = {r["variant"] for r in rows}
    unrun = [{**_head(variant), "not_run": f"not in this result: `make bench-scale TARGET={target} VARIANTS={variant}` "
                                           "(one deploy, 10 to 40 minutes on 2 cores)", "unrun": True}
             for variant in (VARIANTS if size == 224 else ()) if variant not in have]
    return sorted([*rows, *unrun],
                  key=lambda r: VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convnext_deploy.pipeline.bench_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--target", default="onnxruntime")
    ap.add_argument("--minutes", type=float, default=150.0, help="rows whose estimate does not fit what is left of "
                                                                 "this are recorded as not run, with why")
    ap.add_argument("--image-size", type=int, default=224, help="the checkpoints' resolution and the deployment's: "
                                                                 "a stand-in named for it, `--image-size` passed on")
    ap.add_argument("--out", default=None, help="default: benchmarks/<cpu>-<date>/scale-<target>[-<size>].json")
    args = ap.parse_args(argv)
    from convnext_deploy.calibration.user_tree import write_tree
    from convnext_deploy.pipeline.measure.bench_rows import versions
    from convnext_deploy.targets import get_target

    machine, date = machine_record(2), _dt.date.today().isoformat()
    work = cache_root() / "bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    evals, calib = write_tree(work / "data", 1200, 200)
    size = args.image_size
    out = Path(args.out or f"benchmarks/{slug(machine)}-{date}/scale-{args.target}{_suffix(size)}.json")
    # a run of some variants replaces their rows in the day's result and keeps the others
    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    t0, rows = time.monotonic(), []
    for variant in args.variants.split(","):
        left = args.minutes - (time.monotonic() - t0) / 60
        print(f"[{variant}] {left:.0f} min left", flush=True)
        row = _row(variant, args.target, work, (calib, evals), left, size)
        rows.append(row)
        merged = with_unrun([r for r in kept if r["variant"] not in {x["variant"] for x in rows}] + rows,
                            args.target, size)
        print(f"[{variant}] " + (f"not run: {row['not_run']}" if "not_run" in row else
                                 f"exit {row['exit_code']}, {row['seconds']:.0f} s, peak {row['peak_mib']:.0f} MiB "
                                 f"(goal {row['goal_mib']} MiB), " + (f"INT8 {row['ratio']:.2f}× FP32" if "ratio" in row
                                                                   else row["latency"])), flush=True)
        result = {"format": FORMAT, "date": date, "command": "make bench-scale", "target": args.target,
                  "settings": " ".join([*SETTINGS, *_size_flag(size)]), "image_size": size, "machine": machine,
                  "versions": versions({args.target: get_target(args.target).describe_environment()}), "rows": merged}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)  # after every row: a run cut short keeps what it measured
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
