"""INT8 arithmetic as each CPU path does it: `pair_saturated_matmul`, u8 × s8 as x86 without VNNI computes it
(VPMADDUBSW adds each pair of neighbouring products along K into an int16 with saturation; VPMADDWD then sums the
pairs in int32); VNNI, AMX and ARM's dot-product instructions accumulate the exact products in int32.

Running a path this machine does not have is the product's own: `pipeline/device/guest.py` (the x86-avx2 profile,
`qemu-x86_64-static -cpu Haswell-v4`, which runs ONNX Runtime's U8S8 kernels to the same saturated result as a real
AMD EPYC Zen 3, bit for bit; ../shared/FIELD-NOTES.md).
"""
from __future__ import annotations

import numpy as np


def pair_saturated_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [M, K] uint8 × b [K, N] int8 with each pair of neighbouring products (k = 2j, 2j+1) summed in int16 with
    saturation, the pairs summed in int32 (K odd: the last product pairs with a zero)."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)
