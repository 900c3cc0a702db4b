"""What makes an artifact run on a device as it is: the image the device has as its input, and the labels and the
preprocessing rule inside the model file.

Image input: uint8 RGB, batch × height × width × channel (NHWC), the pixels of the resized and centre-cropped image;
the cast, the layout change and the checkpoint's mean/std are ops of the model. In a float graph whose input feeds an
unpadded convolution (ConvNeXt's 4×4 stride-4 stem) mean/std fold into that convolution's weights and bias, which is
exact up to float rounding (no padding reads a zero that normalisation would have moved); otherwise they stay as a
Mul and an Add (an INT8 graph: the stem's input QuantizeLinear then reads the same normalised values as before).
The cast comes before the transpose: TensorRT takes uint8 only as a network input into a cast.

The deploy keeps feeding its float batches (CalibrationData, evaluation, latency): `fed` gives an image-input
artifact's runner the exact inverse of the normalisation (the float batches are made from uint8 crops, so rounding
recovers the same pixels) and keeps the native call beside it, so a latency is timed on uint8 input alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from convnext_deploy.targets.base import Artifact, Runner

META_PREFIX = "convnext_deploy."  # ONNX metadata_props keys; OpenVINO rt_info path ["convnext_deploy", key]
IMAGE, TENSOR = "image", "tensor"
IMAGE_RULE = ("uint8 RGB pixels, NHWC (batch, height, width, 3), of the image resized (shorter side) and "
              "centre-cropped as `resize`/`crop` say; mean/std and the layout change are inside the model")
TENSOR_RULE = "float32 NCHW: pixels / 255, then (x - mean) / std per channel (R, G, B)"


@dataclass(frozen=True)
class Finish:
    """What the finishing step writes into an artifact: its input kind and the checkpoint's record of itself."""

    input: str  # IMAGE | TENSOR
    labels: tuple[str, ...]
    preprocessing: dict  # the checkpoint's Preprocessing as a dict (input_size, crop_pct, interpolation, mean, std)

    def record(self) -> dict:
        """The input record kept in the artifact's metadata and inside the model file."""
        pp = self.preprocessing
        image = self.input == IMAGE
        return {"kind": self.input, "dtype": "uint8" if image else "float32", "layout": "NHWC" if image else "NCHW",
                "mean": list(pp["mean"]), "std": list(pp["std"]), "rule": IMAGE_RULE if image else TENSOR_RULE,
                "resize": f"shorter side to floor(input_size / crop_pct) px, {pp['interpolation']}",
                "crop": "centre, input_size × input_size", "input_size": pp["input_size"], "crop_pct": pp["crop_pct"],
                "interpolation": pp["interpolation"]}

    def metadata(self, record: dict | None = None) -> dict[str, str]:
        """key → text written into the model file: the labels in output order and the input record."""
        return {"labels": json.dumps(list(self.labels)), "preprocessing": json.dumps(record or self.record())}


def image_feed(record: dict):
    """float NCHW normalised batch → the uint8 NHWC pixels it was made from."""
    mean = np.asarray(record["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(record["std"], np.float32).reshape(1, -1, 1, 1)

    def feed(x: np.ndarray) -> np.ndarray:
        pixels = np.clip(np.rint((np.asarray(x, np.float32) * std + mean) * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))

    return feed


def takes_image(artifact: Artifact | dict) -> bool:
    """Whether an artifact (or its metadata, as report.json keeps it) takes uint8 NHWC pixels."""
    meta = artifact.metadata if isinstance(artifact, Artifact) else artifact
    return (meta.get("input") or {}).get("kind") == IMAGE


def fed(runner: Runner, artifact: Artifact) -> Runner:
    """The runner of an image-input artifact taking the deploy's float batches; `native` runs uint8 NHWC itself."""
    if not takes_image(artifact):
        return runner
    feed, native, device_ms = image_feed(artifact.metadata["input"]), runner.run, runner.device_ms
    return replace(runner, run=lambda x: native(feed(x)), feed=feed, native=native,
                   device_ms=None if device_ms is None else (lambda x: device_ms(feed(x))))


def example_input(artifact: Artifact, batch: int, size: int) -> np.ndarray:
    """A batch in the artifact's own input form (random pixels, or a random normalised tensor)."""
    rng = np.random.default_rng(0)
    if takes_image(artifact):
        return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32)


def input_shape(artifact: Artifact, batch: int, size: int) -> list[int]:
    return [batch, size, size, 3] if takes_image(artifact) else [batch, 3, size, size]


# ---------------------------------------------------------------- ONNX

def finish_onnx(src: Path, dst: Path, finish: Finish) -> dict:
    """Write `src` as `dst` with `finish`'s input and metadata; returns the input record (with how mean/std went in).
    The weights are held once: saved as external data tensor by tensor (each freed as it is written), the graph
    checked by path, and the one file streamed back together (ConvNeXt-XL's finish held its FP32 graph 3.7 times)."""
    import tempfile

    import onnx

    from convnext_deploy.pipeline.models.onnx_export import inline_external_data

    proto = onnx.load(str(src))
    record = finish.record()
    if finish.input == IMAGE:
        record["normalisation"] = _image_input(proto.graph, record)
    del proto.metadata_props[:]
    for k, v in finish.metadata(record).items():
        proto.metadata_props.add(key=META_PREFIX + k, value=v)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        apart = Path(tmp) / dst.name
        onnx.save_model(proto, str(apart), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
        del proto
        onnx.checker.check_model(str(apart), full_check=True)
        inline_external_data(apart, dst)
    return record


def _image_input(graph, record: dict) -> str:
    from onnx import TensorProto, helper

    old = graph.input[0]
    name, inner = old.name, old.name + "_normalised"
    for node in graph.node:
        node.input[:] = [inner if i == name else i for i in node.input]
    dims = list(old.type.tensor_type.shape.dim)
    nhwc = [_dim(d) for d in (dims[0], dims[2], dims[3], dims[1])]
    new = helper.make_tensor_value_info(name, TensorProto.UINT8, nhwc)
    graph.input.remove(old)
    graph.input.insert(0, new)
    pixels = [helper.make_node("Cast", [name], [name + "_float"], to=TensorProto.FLOAT, name="image_cast"),
              helper.make_node("Transpose", [name + "_float"], [name + "_nchw"], perm=[0, 3, 1, 2], name="image_nchw")]
    scale = 1.0 / (255.0 * np.asarray(record["std"], np.float64))
    shift = -np.asarray(record["mean"], np.float64) / np.asarray(record["std"], np.float64)
    if _fold_into_stem(graph, inner, scale, shift):
        for node in graph.node:
            node.input[:] = [name + "_nchw" if i == inner else i for i in node.input]
        how = "folded into the stem convolution's weights and bias"
    else:
        pixels += _normalise(graph, name, inner, scale, shift)
        how = "Mul and Add before the stem's input quantization"
    for i, node in enumerate(pixels):
        graph.node.insert(i, node)
    return how


def _dim(d):
    return d.dim_param or (d.dim_value if d.HasField("dim_value") else None)


def _normalise(graph, name: str, inner: str, scale: np.ndarray, shift: np.ndarray) -> list:
    from onnx import helper, numpy_helper

    graph.initializer.extend([numpy_helper.from_array(scale.astype(np.float32).reshape(1, -1, 1, 1), "image_scale"),
                              numpy_helper.from_array(shift.astype(np.float32).reshape(1, -1, 1, 1), "image_shift")])
    return [helper.make_node("Mul", [name + "_nchw", "image_scale"], [name + "_scaled"], name="image_scale"),
            helper.make_node("Add", [name + "_scaled", "image_shift"], [inner], name="image_shift")]


def _fold_into_stem(graph, inner: str, scale: np.ndarray, shift: np.ndarray) -> bool:
    """W'[o, c] = W[o, c]·scale[c], b'[o] = b[o] + Σ W[o, c, i, j]·shift[c]: only for an unpadded Conv that alone
    reads the input, with weight and bias its own initializers (a shared or quantized weight is not rewritten)."""
    from onnx import helper, numpy_helper

    users = [n for n in graph.node if inner in n.input]
    if len(users) != 1 or users[0].op_type != "Conv" or len(users[0].input) < 2:
        return False
    conv = users[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    padded = any(attrs.get("pads", [0])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
    if padded or attrs.get("group", 1) != 1:
        return False
    inits = {t.name: t for t in graph.initializer}
    names = list(conv.input[1:3])
    if any(n not in inits or sum(n in m.input for m in graph.node) != 1 for n in names):
        return False
    w = numpy_helper.to_array(inits[names[0]]).astype(np.float64)
    b = numpy_helper.to_array(inits[names[1]]).astype(np.float64) if len(names) > 1 else np.zeros(w.shape[0])
    folded_w = (w * scale.reshape(1, -1, 1, 1)).astype(np.float32)
    folded_b = (b + np.einsum("ocij,c->o", w, shift)).astype(np.float32)
    inits[names[0]].CopyFrom(numpy_helper.from_array(folded_w, names[0]))
    if len(names) > 1:
        inits[names[1]].CopyFrom(numpy_helper.from_array(folded_b, names[1]))
    else:
        graph.initializer.append(numpy_helper.from_array(folded_b, "stem_folded_bias"))
        conv.input.append("stem_folded_bias")
    return True


def read_onnx_metadata(path: Path) -> dict:
    """The labels and input record written by `finish_onnx` ({} for a model without them)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {k[len(META_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)}
