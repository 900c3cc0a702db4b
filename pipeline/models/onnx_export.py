"""torch → ONNX, checked: `onnx.checker`, shape inference, and parity against eager torch.

The graph has a dynamic batch and dynamic spatial size (any multiple of 32), so one file serves the
checkpoint's own resolution (accuracy) and the deployment resolution (latency).

Choices that decide how fast the graph runs once quantized (measured; see README):
- opset 20: LayerNorm is one `LayerNormalization` node (≥ 17) and GELU one `Gelu` node (≥ 20). At opset 18
  GELU is exported as Div/Erf/Add/Mul/Mul, which ONNX Runtime did not fuse: five float ops on the widest
  tensor of every block.
- layer-scale folded into the second pointwise layer (γ·(Wx + b) = (γW)x + γb): one float Mul less per block,
  and per-channel weight quantization absorbs γ exactly.
- the graph form (pipeline.models.graph_forms): channels-last blocks (the model as defined) or channels-first ones;
  either is checked against the model as defined, so a form is an equivalent graph, never a different model.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.core.forked import in_child
from convnext_deploy.pipeline.measure.memory import release_free_heap
from convnext_deploy.pipeline.models.convnext import fold_layer_scale
from convnext_deploy.pipeline.models.graph_forms import DEFAULT_FORM, to_form

OPSET = 20  # LayerNormalization since 17, Gelu since 20
INPUT_NAME, OUTPUT_NAME = "input", "logits"
SPATIAL_MULTIPLE = 32  # stem /4 then three /2 downsamplings
PARITY_BATCH_PIXELS = 4 * 224 * 224  # images × H × W per parity batch: 4 at 224 px, all 32 at up to 79 px


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    n: int
    tolerance: float
    input_size: int


@dataclass
class ExportResult:
    path: Path
    opset: int
    parity: Parity
    cached: bool
    key: str
    form: str = DEFAULT_FORM


def _versions() -> dict:
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__}


def export_onnx(model: torch.nn.Module, out: Path, example_size: int = 64) -> None:
    """Write the ONNX graph of `model` (layer-scale folded) to `out` with dynamic batch, height and width."""
    import onnx

    model = fold_layer_scale(model)
    x = torch.randn(2, model.in_chans, example_size, example_size)  # batch 2: export would specialise a batch of 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    h = torch.export.Dim("h", min=1, max=64)
    w = torch.export.Dim("w", min=1, max=64)
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch, 2: SPATIAL_MULTIPLE * h, 3: SPATIAL_MULTIPLE * w}}, verbose=False,
        )
    # The weights go to a data file tensor by tensor, the checks read the graph by path (in C++), and the one-file
    # model is streamed together: serialising the whole proto at once held the weights three times over
    # (ConvNeXt-B: 1.0 GB over a 0.35 GB model), which is what made a large variant's export peak.
    staged = out.with_name(out.stem + ".staged.onnx")
    try:
        program.save(str(staged), external_data=True)
        del program
        onnx.checker.check_model(str(staged), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(staged), str(staged), strict_mode=True)
        inline_external_data(staged, out)
    finally:
        for f in out.parent.glob(staged.name + "*"):
            f.unlink()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# protobuf tags (field number << 3 | 2, length-delimited) of ModelProto.graph, GraphProto.initializer, raw_data
_GRAPH, _INITIALIZER, _RAW_DATA = b"\x3a", b"\x2a", b"\x4a"


def inline_external_data(src: Path, out: Path) -> None:
    """`src` (a model whose initializers live in external data files beside it) written to `out` as one file,
    each tensor's bytes copied from its data file as it is written: protobuf parses a message's fields in any
    order and a repeated field from its items one after another, so the graph is its other fields, then one
    initializer after another, each its header, then its raw bytes. Nothing holds more than one tensor."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    tensors = list(model.graph.initializer)
    del model.graph.initializer[:]
    graph = model.graph.SerializeToString()
    model.ClearField("graph")
    head = model.SerializeToString()
    parts = []
    for t in tensors:
        where = {e.key: e.value for e in t.external_data}
        if t.data_location != onnx.TensorProto.EXTERNAL:
            parts.append((t.SerializeToString(), None, 0, 0))
            continue
        meta = onnx.TensorProto()
        meta.CopyFrom(t)
        del meta.external_data[:]
        meta.ClearField("data_location")
        length = int(where["length"])
        parts.append((meta.SerializeToString() + _RAW_DATA + _varint(length), src.parent / where["location"],
                      int(where.get("offset", 0)), length))
    sizes = [len(p[0]) + p[3] for p in parts]
    graph_len = len(graph) + sum(len(_INITIALIZER) + len(_varint(s)) + s for s in sizes)
    with open(out, "wb") as f:
        f.write(head + _GRAPH + _varint(graph_len) + graph)
        for (header, data, offset, length), size in zip(parts, sizes):
            f.write(_INITIALIZER + _varint(size) + header)
            if data is not None:
                with open(data, "rb") as d:
                    d.seek(offset)
                    f.write(d.read(length))


def check_parity(model: torch.nn.Module, onnx_path: Path, images: np.ndarray, tolerance: float) -> Parity:
    """Max |logit difference| and top-1 agreement of ONNX Runtime (FP32, CPU) vs eager torch on real images."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    step = max(1, PARITY_BATCH_PIXELS // (images.shape[2] * images.shape[3]))  # the arena keeps its largest batch
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(images[i:i + step])).numpy()
                              for i in range(0, len(images), step)])
    got = np.concatenate([sess.run(None, {INPUT_NAME: images[i:i + step]})[0] for i in range(0, len(images), step)])
    del sess
    release_free_heap()  # the session's weights and arena, freed, are not kept by the allocator
    parity = Parity(float(np.abs(ref - got).max()), float((ref.argmax(1) == got.argmax(1)).mean()),
                    len(images), tolerance, int(images.shape[-1]))
    if not np.isfinite(got).all():
        raise UserError(f"the exported ONNX gives NaN/inf logits ({onnx_path}); the checkpoint may hold NaN weights")
    if parity.max_abs_diff > tolerance or parity.top1_agreement < 1.0:
        raise RuntimeError(
            f"ONNX export parity failed: max |Δlogit| {parity.max_abs_diff:.2e} (tolerance {tolerance:.0e}), "
            f"top-1 agreement {parity.top1_agreement:.4f} on {len(images)} images"
        )
    return parity


def export_cached(model: torch.nn.Module, checkpoint_sha256: str, variant: str, images: np.ndarray,
                  tolerance: float = 1e-3, log=print, form: str = DEFAULT_FORM) -> ExportResult:
    """Export `model` in graph `form` once per (checkpoint, variant, form, opset, versions, code); parity against
    `model` itself is re-checked on every call's images."""
    # checkpoints too: its key mapping and model code decide what the same checkpoint file becomes
    code = code_digest("convnext_deploy.pipeline.models.onnx_export", "convnext_deploy.pipeline.models.checkpoints")
    key = key_of("export", checkpoint_sha256, variant, form, OPSET, _versions(), model.num_classes, code)

    def build(tmp: Path) -> None:
        export_onnx(to_form(model, form), tmp / "model.onnx")
        (tmp / "export.json").write_text(json.dumps({"opset": OPSET, "versions": _versions(), "form": form,
                                                     "checkpoint_sha256": checkpoint_sha256, "variant": variant}))

    # in a child process: the exporter's copies of the weights go back to the kernel when it ends
    directory, cached = cached_dir("export", key, lambda tmp: in_child(build, tmp, what=f"{variant} ONNX export"),
                                   log=log)
    path = directory / "model.onnx"
    parity = check_parity(model, path, images, tolerance)
    return ExportResult(path, OPSET, parity, cached, key, form)


def parity_dict(p: Parity) -> dict:
    return asdict(p)
