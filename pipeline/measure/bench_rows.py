"""What `make bench` needs beside the measuring itself: its two modes, the time a run may take and how it is
shared among rows, the record of the machine and software every figure belongs to, where the result goes, and the
printing of rows and progress.

A result file is what `reports/benchmarks.py` turns into BENCHMARKS.md, so it carries, beside the rows, the date,
the CPU (model name, family/model, the ISA extensions that decide the INT8 and BF16 kernels) and the library
versions: a figure without them cannot be compared with another machine's.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field

from convnext_deploy.pipeline.measure.machine import cpu_identity, cpu_profile

# The two modes. The default is bounded so that it ends in minutes on two cores: the real targets only, the two
# variants whose INT8 speed-ups differ most, fewer timed calls, part of the test split, and a deadline that the
# rows' timing shares are cut to. `--full` is the whole grid: every target (proxies give accuracy only), outliers,
# more calls, the whole test split and a longer timing budget per row, with no deadline.
BOUNDED = {"targets": "onnxruntime,openvino", "variants": "atto,t", "runs": 100, "eval": 2000, "budget": 120.0,
           "minutes": 6.5}  # a first run on an empty cache overran 8 by two minutes of builds
FULL = {"targets": None, "variants": "atto,t,atto+outliers", "runs": 200, "eval": None, "budget": 240.0,
        "minutes": 0.0}
FORMAT = "convnext-deploy bench 2"  # what reports/benchmarks.py reads


def machine_record(threads: int) -> dict:
    """The CPU a result belongs to: its name, family/model, the INT8/BF16 ISA flags and kernel paths."""
    return {**cpu_profile(), **cpu_identity(), "cores": os.cpu_count(), "threads": threads, "os": platform.platform()}


def versions(environments: dict[str, dict]) -> dict[str, str]:
    """python, torch, numpy and every toolchain version the targets report (`describe_environment`)."""
    import numpy
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__}
    for env in environments.values():
        out.update({k: v for k, v in env.items() if isinstance(v, str)})
    return out


def slug(machine: dict) -> str:
    """A folder name for a CPU: its model name, and its generation (or family/model) so that two CPUs sold
    under one name ("AMD EPYC" on a VM) keep apart."""
    import re

    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", machine["cpu"].lower())
    parts = [re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"]
    if machine.get("generation"):
        parts.append(re.sub(r"[^a-z0-9]+", "", machine["generation"].lower()))
    elif machine.get("cpu_family") is not None:
        parts.append(f"f{machine['cpu_family']}m{machine['cpu_model']}")
    return "-".join(parts)


def default_out(machine: dict, date: str, full: bool) -> str:
    return f"benchmarks/{slug(machine)}-{date}/{'bench-full' if full else 'bench'}.json"


@dataclass
class Clock:
    """The run's time: a deadline (`minutes`, 0: none) shared among the rows' timing, each share capped at
    `budget` seconds. A row's timing share is fixed when its timing starts: what is left to the deadline, less
    what the rows still to come will spend outside their timing (building, loading, evaluating: as the rows so far
    did, the same variant's if one ran), divided among this row and those to come."""

    rows: int
    minutes: float
    budget: float
    start: float = field(default_factory=time.monotonic)
    fixed: dict[str, float] = field(default_factory=dict)  # variant → seconds a row spent outside its timing

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def share(self, done: int, variants_to_come: list[str]) -> float:
        """Seconds of timing for row `done` (0-based); `variants_to_come`: the variants of the rows after it."""
        if not self.minutes:
            return self.budget
        usual = max(self.fixed.values(), default=0.0)
        later = sum(self.fixed.get(v, usual) for v in variants_to_come)
        left = self.minutes * 60 - self.elapsed() - later
        return max(0.0, min(self.budget, left / (1 + len(variants_to_come))))

    def estimate(self) -> str:
        if self.minutes:
            return (f"{self.rows} rows, timing shared to end within about {self.minutes:g} minutes (at most "
                    f"{self.budget:g} s of timing a row); a first run on an empty .cache/ builds every artifact first "
                    "and takes longer")
        return (f"{self.rows} rows, up to {self.budget:g} s of timing each plus building and evaluating: about "
                f"{self.rows * (self.budget / 60 + 2):.0f} minutes or more")


def progress(i: int, clock: Clock, row: dict, seconds: float) -> str:
    """The line printed when row `i` (1-based) is done: what it measured, the headline ratio, the time."""
    ratios = row.get("ratios", {})
    head = next((k for k in ratios if k.startswith("int8 ours (default) vs")), next(iter(ratios), None))
    figure = (f"{head} {ratios[head]['value']:.2f}× [{ratios[head]['ci95'][0]:.2f}, {ratios[head]['ci95'][1]:.2f}]"
              if head else "accuracy only (proxy)")
    bound = f" of ~{clock.minutes:g}" if clock.minutes else ""
    return (f"[{i}/{clock.rows}] {row['target']} · {row['variant']}: {len(row['p50_ms'])} runners, "
            f"{row.get('rounds', 0)} rounds; {figure}; {seconds:.0f} s, {clock.elapsed() / 60:.1f}{bound} min elapsed")


OUTLIER_K = 30.0  # "<variant>+outliers": the checkpoint with injected 30× norm-channel outliers (same FP32 function)


def bench_checkpoint(variant: str) -> tuple:
    """(checkpoint, how its weights were made, whether it has a reference accuracy) for `variant[+outliers]`."""
    from dataclasses import replace
    from pathlib import Path

    import torch

    from convnext_deploy.calibration.fashion_mnist import CLASS_NAMES, FashionMNIST
    from convnext_deploy.pipeline.core.cache import key_of
    from convnext_deploy.pipeline.decisions.outliers import inject_outliers
    from convnext_deploy.pipeline.models.checkpoints import LoadedCheckpoint, load_checkpoint
    from convnext_deploy.pipeline.models.convnext import create_model
    from convnext_deploy.pipeline.models.reference import reference_path
    from convnext_deploy.pipeline.models.train import dataset_preprocessing
    from convnext_deploy.pipeline.models.variants import get_variant

    base, _, extra = variant.partition("+")
    if extra not in ("", "outliers"):
        raise SystemExit(f"unknown bench variant {variant!r}: use a variant name, optionally with +outliers")
    ref = reference_path(base)
    if ref.exists():
        ck, weights = load_checkpoint(ref, base), f"reference {ref}"
    else:
        torch.manual_seed(0)
        model = create_model(base, num_classes=10).eval()
        pp = dataset_preprocessing(FashionMNIST("train"), 32)
        ck = LoadedCheckpoint(model, get_variant(base), "ours", 10, tuple(CLASS_NAMES), pp, Path(f"<{base} as initialised>"),
                              key_of("init", base), {"dataset": {"name": "fashion-mnist"}})
        weights = "as initialised (no reference checkpoint)"
    if extra:
        ck = replace(ck, model=inject_outliers(ck.model, OUTLIER_K), sha256=key_of("outliers", ck.sha256, OUTLIER_K))
        weights += f", {OUTLIER_K:g}× channel outliers injected"
    return ck, weights, ref.exists()


def distance_and_streams(target, model, runners: dict, artifacts: dict, lat: dict, size: int, threads: int,
                         log) -> dict:
    """Each timed runner's effective MAC rate against the runtime's GEMM peak of the precision it executes
    (pipeline.measure.peak), and the throughput of `artifacts` (label → artifact; `runners` has a runner of each
    label) at batch 8 and in the runtime's own throughput mode (pipeline.measure.throughput)."""
    from convnext_deploy.pipeline.measure.peak import fraction, model_macs, runtime_peak
    from convnext_deploy.pipeline.measure.throughput import BATCH, batched, throughput

    peak = runtime_peak(target, threads, log)
    macs = model_macs(model, size)
    rates = {k: fraction(macs, lat[k].p50_ms, peak, runners[k].precision.split()[0].rstrip(":")) for k in lat}
    ways = {f"{k} · batch {BATCH}": batched(runners[k].run) for k in artifacts if k in lat}
    if target.stream_runner is not None:
        ways.update({f"{k} · {STREAM_MODE.get(target.name, 'streams')}": target.stream_runner(a, threads, size)
                     for k, a in artifacts.items() if k in lat})
    return {"macs": macs, "peak": peak, "mac_rate": {k: v for k, v in rates.items() if v},
            "throughput": throughput(ways, size, STREAM_SECONDS) if ways else {}}


STREAM_MODE = {"openvino": "THROUGHPUT hint, async requests", "onnxruntime": "parallel 1-thread sessions"}
STREAM_SECONDS = 6.0


def print_rows(rows: list[dict]) -> None:
    from convnext_deploy.reports.benchmarks import distance_lines, stream_lines

    for r in rows:
        print(f"\n{r['target']} · {r['variant']} · {r['input_size']} px · batch 1 · {r['device']} · {r['runtime']}")
        acc_note = (f"top-1 on {r['eval']['split']} ({r['eval']['n']} images, {r['eval']['input_size']} px)"
                    if "top1" in r else f"top-1 not measured: weights {r['weights']}")
        print(f"  {'':52} {'p50 ms':>8}  {acc_note}, drop vs {next(iter(r['p50_ms']))}")
        for k, ms in r["p50_ms"].items():
            acc = f"{r['top1'][k] * 100:.2f}%  {r['drop_pp'][k]:+.2f} pp" if "top1" in r else "—"
            print(f"  {k:52} {(f'{ms:8.2f}' if ms is not None else '  proxy'):>8}  {acc}")
        for name, q in r["ratios"].items():
            unresolved = "" if q["resolved"] else ", unresolved: the time budget ended first"
            print(f"  speed-up {name}: {q['value']:.2f}× [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}] "
                  f"({q['verdict']}{unresolved})")
        if r.get("rounds"):
            print(f"  {r['rounds']} undisturbed rounds over {r['instances']} loads of every artifact"
                  + (f"; {r['disturbed_rounds']} disturbed rounds left out (the whole machine slower)"
                     if r.get("disturbed_rounds") else ""))
        for line in distance_lines(r) + stream_lines(r):  # the distance to the runtime's peak, the throughput
            print("  " + line.removeprefix("- "))
        if r.get("peak_rss_mib"):
            print(f"  peak RSS of this row (build, time, evaluate): {r['peak_rss_mib']:.0f} MiB")
        for note in r.get("skipped", []):
            print(f"  note: {note}")
