"""The Core ML proxy: what stands in for `MLModel.predict` where Core ML cannot run (every OS but macOS).

Not a target: a tool the Core ML target (targets.coreml_apple) calls. It reads a package back, gives the torch
model the package's own numbers, saves and loads that proxy, and offers the per-layer probe of the W8A8 proxy.

- Labelled "Core ML proxy (not executed by Core ML)" everywhere it appears; no latency is reported for it.
- FP16: the folded model in torch half precision (weights and activations FP16, as Core ML computes);
  W8: that model with its weights replaced by the INT8 values and scales read back *from the package*;
  W8A8: the finalized torch model the package was converted from (its weights, activation scales and zero
  points are the package's; its float ops run in FP32 where Core ML runs FP16). Tests check the read-back
  equality.
- The proxy is saved as TorchScript beside the package (not shipped with it), so accuracy is measured on
  exactly what was traced at build time.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.measure.machine import device_label
from convnext_deploy.targets.base import Artifact, LayerProbe, Runner, probe_chunks

PROXY_LABEL = "Core ML proxy (not executed by Core ML)"
PROXY_FILE = "proxy_{precision}.pt"  # TorchScript of the proxy; kept beside the package, not shipped with it

_EXECUTED = {
    "fp16": "fp16 (torch half: FP16 weights and activations)",
    "w8": "int8 weights read back from the package, dequantized; FP16 compute",
    "int8": "W8A8 fake-quantized with the package's weights and activation scales; float ops in FP32 (Core ML: FP16)",
}


@contextlib.contextmanager
def quiet():
    """coremltools logs, at import and on every call, lines that say nothing about this run (its macOS-only
    bindings missing on Linux, the untested-torch warning, sklearn) and draws progress bars for every pass;
    torch warns about its quantized tensors. All of it is held back, and shown only if the call fails."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(held):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(held.getvalue()[-4000:])
        raise
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def load_ct():
    """coremltools, imported quietly."""
    with quiet():
        import coremltools as ct
    return ct


# ---------------------------------------------------------------- reading a package back

def read_program(package: Path):
    """The MIL program stored in a package (weights from its blob file): what a device will load."""
    ct = load_ct()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    with quiet():
        ml = ct.models.MLModel(str(package), skip_model_load=True)
        spec = ml.get_spec()
        return milproto_load(spec, spec.specificationVersion, str(ml.weights_dir)), spec


def _dequantized(op) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(float weight, int values, scales, dtype) of a constexpr weight-dequantization op."""
    if op.op_type == "constexpr_affine_dequantize":
        q, scale, zp, axis = op.quantized_data.val, op.scale.val, op.zero_point.val, op.axis.val
        shape = [1] * q.ndim
        if np.ndim(scale):
            shape[axis] = -1
        w = (q.astype(np.float32) - np.reshape(zp, shape).astype(np.float32)) * np.reshape(scale, shape).astype(np.float32)
        return w, q, np.asarray(scale), str(q.dtype)
    if op.op_type == "constexpr_blockwise_shift_scale":  # iOS 18 form
        q, scale = op.data.val, op.scale.val
        offset = op.offset.val if op.offset is not None else 0
        reps = [a // b for a, b in zip(q.shape, scale.shape)]
        w = (q.astype(np.float32) - np.kron(np.asarray(offset, np.float32), np.ones(reps)))
        w = w * np.kron(scale.astype(np.float32), np.ones(reps, np.float32))
        return w, q, np.asarray(scale), str(q.dtype)
    raise ValueError(f"{op.op_type} is not a weight dequantization op")


def layer_precisions(prog) -> list[dict]:
    """Per conv/linear layer of a package's program, in network order: weight storage and whether its input
    activation is INT8 (fed by a `dequantize` op)."""
    rows = []
    for op in prog.functions["main"].operations:
        if op.op_type not in ("conv", "linear"):
            continue
        w_op, x_op = op.weight.op, op.x.op
        if w_op is not None and w_op.op_type.startswith("constexpr_"):
            _, _, scale, dtype = _dequantized(w_op)
            weight = f"{dtype} ({'per-channel' if np.size(scale) > 1 else 'per-tensor'})"
        else:
            from coremltools.converters.mil.mil import types

            weight = types.builtin_to_string(op.weight.dtype)
        act = "int8" if (x_op is not None and x_op.op_type == "dequantize") else "float"
        rows.append({"layer": op.name, "op": op.op_type, "weight": weight, "activation": act,
                     "shape": list(op.weight.shape)})
    return rows


def _stored_weights(prog) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(float weight, INT8 scales or None) of every conv/linear in network order, as the package stores them."""
    out = []
    for op in prog.functions["main"].operations:
        if op.op_type in ("conv", "linear"):
            w_op = op.weight.op
            if w_op is not None and w_op.op_type.startswith("constexpr_"):
                w, _, scale, _ = _dequantized(w_op)
                out.append((w, scale))
            else:
                out.append((np.asarray(op.weight.val, np.float32), None))
    return out


def package_weights(package: Path) -> list[np.ndarray]:
    """Dequantized weights of every conv/linear in network order (FP16 constants as stored)."""
    return [w for w, _ in _stored_weights(read_program(package)[0])]


def package_activation_scales(package: Path) -> list[tuple[float, int]]:
    """(scale, zero point) of every activation `quantize` op in the package, in the units of the float tensor.

    The converter rewrites add(dequantize(a), dequantize(b)) → quantize into relative scales (the dequantizes
    get s_a/s_b and 1, the quantize s_out/s_b); the effective scale multiplies the unit s_b back in."""
    prog, _ = read_program(package)
    out = []
    for op in prog.functions["main"].operations:
        if op.op_type != "quantize":
            continue
        zp = op.zero_point.val if op.zero_point is not None else 0
        scale = float(np.asarray(op.scale.val))
        src = op.inputs["input"].op
        if src is not None and src.op_type == "add":
            dq = src.inputs["y"].op
            if dq is not None and dq.op_type == "dequantize" and dq.inputs["input"].op is not None \
                    and dq.inputs["input"].op.op_type == "quantize":
                unit = float(np.asarray(dq.inputs["input"].op.scale.val)) / float(np.asarray(dq.scale.val))
                scale *= unit
        out.append((scale, int(np.asarray(zp))))
    return out


# ---------------------------------------------------------------- the proxy

def align_to_package(core, prog, precision: str) -> None:
    """Give the proxy the package's own numbers. The converter casts weights to FP16 before quantizing and
    stores scales in FP16, so some INT8 weights land one step away from torch's own rounding; the proxy therefore
    takes the weights (and W8A8 scales) read back from the package."""
    import torch

    from convnext_deploy.pipeline.models.convnext import weight_layers

    stored = _stored_weights(prog)
    modules = [m for _, m in weight_layers(core)]
    if [w.shape for w, _ in stored] != [tuple(m.weight.shape) for m in modules]:
        raise RuntimeError(f"the {precision} package's layers do not line up with the torch model's; cannot build its proxy")
    with torch.no_grad():
        for m, (w, scale) in zip(modules, stored):
            m.weight.copy_(torch.from_numpy(w))
            if scale is not None and hasattr(m, "weight_scale"):  # W8A8 reference module fake-quantizes with it
                m.weight_scale.copy_(torch.from_numpy(np.asarray(scale, np.float32)).reshape(m.weight_scale.shape))
        for name, buf in core.named_buffers():
            if re.search(r"_scale_\d+$", name):  # activation scales, FP16 in the package
                buf.copy_(buf.to(torch.float16).to(buf.dtype))


def save_proxy(core, example, precision: str, out_dir: Path) -> Path:
    """TorchScript of exactly what the accuracy figures are computed with, written atomically beside the package."""
    import torch

    from convnext_deploy.pipeline.core.cache import publish_file

    with torch.no_grad(), quiet():
        if precision in ("fp16", "w8"):
            traced = torch.jit.trace(copy.deepcopy(core).half(), example.half())
        else:
            traced = torch.jit.trace(core, example)
    return publish_file(out_dir / PROXY_FILE.format(precision=precision), lambda p: traced.save(str(p)))


def proxy_runner(artifact: Artifact, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)
    path = artifact.files[0].parent / artifact.metadata["proxy_file"]
    with quiet():  # torch marks TorchScript loading deprecated; it is the one format the traced proxy saves in
        module = torch.jit.load(str(path)).eval()
    half = artifact.precision in ("fp16", "w8")

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.no_grad(), quiet():
            y = module(x.half() if half else x)
        return y.float().numpy()

    return Runner(run, f"torch {torch.__version__} CPU", device_label(threads),
                  _EXECUTED[artifact.precision], threads, proxy=PROXY_LABEL, timed=False)


# ---------------------------------------------------------------- the per-layer probe (W8A8)

def _floated(q, float_core, paths: set[str]):
    """The finalized W8A8 model with the named layers reading their activation before its quantize/dequantize
    and holding the FP32 weights (the package's float layers would be FP16). A graph of its own over `q`'s modules:
    a deep copy of the whole model for each of a hundred passes held one more ConvNeXt-B at a time."""
    import torch

    m = torch.fx.GraphModule(q, copy.deepcopy(q.graph))  # new containers, the leaf modules `q`'s own
    for node in list(m.graph.nodes):
        if node.op == "call_module" and node.target in paths:
            dq = node.args[0]
            if getattr(dq, "op", None) == "call_method" and dq.target == "dequantize" \
                    and getattr(dq.args[0], "target", None) is torch.quantize_per_tensor:
                node.replace_input_with(dq, dq.args[0].args[0])
            own = float_core.get_submodule(node.target)
            sub = m.get_submodule(node.target)
            if hasattr(sub, "linear"):  # Linear+GELU fused: a copy of that one module, its Linear in float
                sub = copy.deepcopy(sub)
                sub.linear = own
                own = sub
            parent, _, leaf = node.target.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, own)
            if q.get_submodule(node.target) is own:  # a container shared with `q` (a module the graph calls whole)
                raise RuntimeError(f"floating {node.target} would change the W8A8 model itself")
    m.recompile()
    return m


def layer_probe(artifacts: dict, images: np.ndarray, threads: int, model, calibration, calibrate) -> LayerProbe:
    """The W8A8 proxy for the sensitivity loop, rebuilt from the same model and calibration with `calibrate`
    (the target's calibrate_w8a8, as its build ran it), given the package's weights and scales and checked
    against the saved proxy. A layer "in float" reads its input activation before quantize/dequantize and
    holds its FP32 weight; the all-float reference has every conv/linear so. Norm and residual quantizers
    stay, as they are separate ops in the package."""
    import torch

    from convnext_deploy.pipeline.models.convnext import fold_layer_scale

    if model is None or calibration is None:
        raise ValueError("the Core ML layer probe rebuilds the W8A8 proxy: it needs the model and its calibration data")
    art = artifacts["int8"]
    torch.set_num_threads(threads)
    float_core = fold_layer_scale(model)
    with quiet():
        q = calibrate(fold_layer_scale(model), calibration, art.metadata["build"])
        align_to_package(q, read_program(art.files[0])[0], "int8")
    saved = proxy_runner(art, threads).run
    rebuilt_diff = 0.0
    for chunk in probe_chunks(images[:32]):  # in chunks: 32 images of ConvNeXt-B's activations at once were a GiB
        with torch.no_grad(), quiet():
            rebuilt_diff = max(rebuilt_diff, float(np.abs(q(torch.from_numpy(chunk)).numpy() - saved(chunk)).max()))
    del saved
    # the quantized conv/linear modules (a fused Linear+GELU holds its reference Linear as `.linear`)
    paths = [n.target for n in q.graph.nodes if n.op == "call_module"
             and any(hasattr(q.get_submodule(n.target), a) for a in ("weight_scale", "linear"))]

    def run(floated: set, tapped: list):
        m = _floated(q, float_core, set(floated)) if floated else q
        got: dict[str, np.ndarray] = {}
        handles = [m.get_submodule(p).register_forward_hook(lambda _m, _i, o, p=p: got.__setitem__(p, o.detach().numpy()))
                   for p in tapped]
        try:
            for chunk in probe_chunks(images):
                with torch.no_grad(), quiet():
                    logits = m(torch.from_numpy(chunk)).numpy()
                yield [logits] + [got[p] for p in tapped]
        finally:
            for h in handles:
                h.remove()

    return LayerProbe(
        paths, run, PROXY_LABEL, "proxy", modules=list(paths),
        ops=[type(float_core.get_submodule(p)).__name__.lower() for p in paths],
        details={"rebuilt_proxy_max_abs_diff": rebuilt_diff,
                 "float_reference": "the proxy with every conv/linear input and weight in float (norm/add quantizers kept)",
                 "weights": ["int8 (package)"] * len(paths)})
