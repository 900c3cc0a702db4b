"""Throughput beside latency, for devices that classify streams: images per second at batch 8 through the same
runner the latency is timed with, and through the runtime's own throughput mode (Target.stream_runner: OpenVINO's
THROUGHPUT hint with an async request queue, ONNX Runtime's parallel single-threaded sessions), batch 1 per
request.

Like the latency harness, every way and artifact takes turns round by round, so a disturbed stretch of the machine
hits them alike; a figure is the median of the rounds' images per second, with their range.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

BATCH = 8
IMAGES = 32  # per round and way: four batches of 8, or 32 requests in flight over the streams


def batched(run: Callable[[np.ndarray], np.ndarray], batch: int = BATCH) -> Callable[[np.ndarray], object]:
    def run_many(images: np.ndarray) -> None:
        for i in range(0, len(images), batch):
            run(images[i:i + batch])

    return run_many


def throughput(ways: dict[str, Callable[[np.ndarray], object]], input_size: int, seconds: float,
               min_rounds: int = 3) -> dict[str, dict]:
    """label → {"images_per_s": median over rounds, "range": [lowest, highest], "rounds": n}; rounds go on until
    `seconds` have passed (at least `min_rounds`)."""
    images = np.random.default_rng(0).standard_normal((IMAGES, 3, input_size, input_size), dtype=np.float32)
    for run_many in ways.values():  # warm: compiled shapes, arenas, thread pools
        run_many(images[:BATCH])
    rates: dict[str, list[float]] = {k: [] for k in ways}
    start = time.monotonic()
    while min(len(v) for v in rates.values()) < min_rounds or time.monotonic() - start < seconds:
        for label, run_many in ways.items():
            t0 = time.perf_counter()
            run_many(images)
            rates[label].append(IMAGES / (time.perf_counter() - t0))
    return {k: {"images_per_s": round(float(np.median(v)), 1), "range": [round(min(v), 1), round(max(v), 1)],
                "rounds": len(v)} for k, v in rates.items()}
