"""ONNX Runtime as a tool the targets share: one session factory, one runner, one calibration reader, one
quantize_static.

Not a target. ONNX Runtime runs the portable target, the TensorRT Q/DQ proxy and the per-layer probes of
both; ORT's static quantizer writes the Q/DQ graphs of both.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.core.cache import cached_dir, key_of, sha256_file
from convnext_deploy.pipeline.measure.machine import device_label
from convnext_deploy.targets.base import CalibrationData, Runner


def session(model: Path | bytes, threads: int, optimize: bool = True, optimized_out: Path | None = None,
            profile_prefix: Path | None = None, low_memory: bool = False):
    """A CPU session with `threads` intra-op threads, run sequentially. `optimize=False` runs the graph as
    written (the TensorRT proxy: no fusion may turn Q/DQ arithmetic into other kernels). `low_memory`: no arena
    and no memory pattern, so what a run allocated is returned (the per-layer probes, whose graphs output every
    layer's activation, would otherwise keep the largest of them for the session's life)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its warning on saving an NCHWc-optimized graph is expected here
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle worker threads spin by default, waiting for the next run: with several sessions timed in turns (every
    # candidate against FP32), the one running shares the 2 cores with the others' spinning threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if low_memory:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
    if profile_prefix is not None:  # ORT's profiler: per-node kernel times, written when profiling ends
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])


def runtime_label() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} CPUExecutionProvider"


def runner(model: Path, threads: int, executed: str, optimize: bool = True, proxy: str | None = None) -> Runner:
    """An ONNX file run by a CPU session; `executed` says what precision really ran. A `proxy` (a stand-in for
    another runtime) is left untimed: its latency would say nothing about the runtime it stands for."""
    sess = session(model, threads, optimize=optimize)
    first = sess.get_inputs()[0]
    name, dtype = first.name, np.uint8 if first.type == "tensor(uint8)" else np.float32  # an image-input model

    def run(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: np.ascontiguousarray(batch, dtype=dtype)})[0]

    return Runner(run, runtime_label(), device_label(threads), executed, threads, proxy=proxy, timed=proxy is None)


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over our calibration images, in equal-size batches."""

    def __init__(self, calibration: CalibrationData, input_name: str, image_bytes: int = 0):
        h, w = calibration.images.shape[2:]
        # the calibration session's memory grows with the batch, not the image count: batches bounded by pixels and
        # by what one image holds in it (`image_bytes`, calibration_image_bytes)
        most = CALIBRATION_BATCH_PIXELS // (h * w)
        if image_bytes:
            most = min(most, CALIBRATION_ACTIVATION_BYTES // image_bytes)
        self._batches = list(calibration.equal_batches(max(1, min(32, most))))
        self._name = input_name
        self._it = iter(self._batches)

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {self._name: b}

    def rewind(self):
        self._it = iter(self._batches)


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
CALIBRATION_BATCH_PIXELS = 1 << 18  # images × H × W per calibration batch: 32 at 32–90 px, 5 at 224 px
# The calibration session holds every tensor of an image's pass at once: the calibrator adds a ReduceMin and a
# ReduceMax per tensor as graph outputs, which ONNX Runtime runs after the whole network. Measured for ConvNeXt-B at
# 224 px: 0.73 GB per image (5 images: 4.8 GB for a 0.35 GB model); its blocks' depthwise outputs sum to 4.7 M
# floats an image, so about 39 tensors of that size are alive per block output.
CALIBRATION_ACTIVATION_BYTES = 1 << 30
TENSORS_PER_BLOCK_OUTPUT = 40


def calibration_image_bytes(model, h: int, w: int) -> int:
    """What one image at h × w holds in the calibration session of a ConvNeXt graph: every block's output size
    (its depthwise convolution's channels at its stage's stride, 4 × channels / the first stage's) times the
    tensors alive per block output."""
    dw = [list(t.dims) for t in model.graph.initializer if len(t.dims) == 4 and t.dims[1] == 1 and t.dims[2] >= 3]
    if not dw:
        return 0
    first = min(d[0] for d in dw)
    return int(sum(d[0] * h * w / (4 * d[0] / first) ** 2 for d in dw) * 4 * TENSORS_PER_BLOCK_OUTPUT)


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = dict(zip(CALIBRATION_METHODS, (CalibrationMethod.MinMax, CalibrationMethod.Percentile,
                                              CalibrationMethod.Entropy)))
    if name not in methods:
        raise ValueError(f"unknown calibration method {name!r}; use one of {sorted(methods)}")
    return methods[name]


def quantize(src: Path, dst: Path, calibration: CalibrationData, float_layers=(), torch_model=None,
             optimize: bool = True, **quantize_kwargs) -> None:
    """ORT's pre-processing (symbolic shape inference, and graph optimisation unless `optimize=False`), then
    `quantize_static` on our calibration split. `float_layers`: checkpoint layer names left without Q/DQ (named
    in the graph by network order, which needs the torch model). With no `quantize_kwargs`, quantize_static's
    own defaults (the peer's recipe)."""
    import onnx
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from convnext_deploy.targets.qdq import node_names_for

    pre = dst.with_name(dst.stem + ".preprocessed.onnx")
    try:
        if optimize:
            pre_process(src, pre)
        else:  # no symbolic shape inference: the export carries ONNX's own inferred shapes
            quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        pre_model = onnx.load(str(pre), load_external_data=False)
        reader = CalibrationReader(calibration, pre_model.graph.input[0].name,
                                   calibration_image_bytes(pre_model, *calibration.images.shape[2:]))
        excluded = node_names_for(pre_model, torch_model, list(float_layers)) if float_layers else []
        if excluded or quantize_kwargs:
            quantize_kwargs["nodes_to_exclude"] = list(quantize_kwargs.get("nodes_to_exclude", [])) + excluded

        # not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the collected ranges instead of merging them
        def calibrate_and_quantize(tmp: Path) -> None:
            with lean_calibration():
                quantize_static(str(pre), str(dst), reader, calibration_cache_path=str(tmp / RANGES),
                                **quantize_kwargs)

        ranges, cached = cached_dir("calibration-ranges", _ranges_key(pre, calibration, quantize_kwargs),
                                    calibrate_and_quantize, log=lambda _: None)
        if cached:  # the same graph, images and calibration settings: another candidate's ranges, read back
            quantize_static(str(pre), str(dst), None, calibration_cache_path=str(ranges / RANGES), **quantize_kwargs)
    finally:
        pre.unlink(missing_ok=True)
        weights_of(pre).unlink(missing_ok=True)


def weights_of(pre: Path) -> Path:
    """The external data file `pre_process` writes a pre-processed graph's weights to, beside it."""
    return pre.with_name(pre.name + ".data")


def pre_process(src: Path, dst: Path) -> None:
    """What `quant_pre_process` does to an exported ConvNeXt (no symbolic shape inference: the export carries
    ONNX's own inferred shapes), without its copies of the weights: ORT's basic graph optimisation in a session
    that does not prepack them, writing them to `dst`'s external data file; ONNX's shape inference by path on the
    graph alone; the same metadata. The graph is node for node the library's, its weights bit for bit (ConvNeXt-B:
    377 nodes, max |Δ| 0), in 447 MiB where the library held 1,440."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    optimized = dst.with_name(dst.stem + ".optimized.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(optimized)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as quant_pre_process
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights_of(dst).name)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        onnx.shape_inference.infer_shapes_path(str(optimized), str(optimized))
        graph = onnx.load(str(optimized), load_external_data=False)
        add_pre_process_metadata(graph)
        onnx.save(graph, str(dst))  # beside the data file: the external references stay valid
    finally:
        optimized.unlink(missing_ok=True)


@contextmanager
def lean_calibration():
    """quantize_static's calibrator in less memory, measuring the same: its session runs the graph in the order that
    frees tensors soonest (the calibrator makes every tensor a graph output, alive to the end of a pass), and the
    augmented graph it has saved is let go (ConvNeXt-B, 20 images at 224 px on a Zen 4: 1.8 → 1.1 GiB, collection as
    fast; not prepacking the weights saved 0.3 GiB alone, nothing beside these, and took up to 30 % longer).
    quantize_static exposes no session options: the calibrator's one session factory is replaced while the block
    runs, and this fails where the pinned onnxruntime no longer has it."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibraterBase

    library = CalibraterBase.__dict__["create_inference_session"]  # KeyError: the library changed; see above

    def create_inference_session(self) -> None:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the library's
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        self.model = None  # augment_graph saved it to augmented_model_path, which the session reads
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=so,
                                                  providers=self.execution_providers)

    CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = library


RANGES = "ranges.json"
# quantize_static's arguments that change what the calibrator measures (the rest only change what is quantized)
CALIBRATION_EXTRA = ("CalibTensorRangeSymmetric", "CalibMovingAverage", "CalibMovingAverageConstant",
                     "CalibPercentile")


def _ranges_key(pre: Path, calibration: CalibrationData, kwargs: dict) -> str:
    """Calibration ranges are per tensor of the float graph, so every candidate quantizing the same pre-processed
    graph with the same images and calibration settings shares them: the candidates, the latency-aware rebuild and
    each fallback rebuild (float layers only exclude nodes) calibrate once, not once each."""
    import hashlib

    import onnxruntime as ort

    extra = kwargs.get("extra_options") or {}
    data = weights_of(pre)  # where pre-processing wrote them apart from the graph
    return key_of("ort-calibration", ort.__version__, sha256_file(pre), data.exists() and sha256_file(data),
                  hashlib.sha256(calibration.images.tobytes()).hexdigest(), calibration.images.shape,
                  str(kwargs.get("calibrate_method")), kwargs.get("op_types_to_quantize"),
                  {k: extra[k] for k in CALIBRATION_EXTRA if k in extra})


def stream_runner(model: Path, threads: int):
    """ONNX Runtime's way to a stream's throughput: one single-threaded session per thread, each taking every
    `threads`-th image (batch 1). Returns run_many(images) → their logits, in order."""
    from concurrent.futures import ThreadPoolExecutor

    sessions = [session(model, 1) for _ in range(threads)]
    name = sessions[0].get_inputs()[0].name
    pool = ThreadPoolExecutor(threads)

    def worker(k: int, images: np.ndarray, out: list) -> None:
        for i in range(k, len(images), threads):  # ORT releases the GIL inside run: the sessions run in parallel
            out[i] = sessions[k].run(None, {name: np.ascontiguousarray(images[i:i + 1], dtype=np.float32)})[0][0]

    def run_many(images: np.ndarray) -> np.ndarray:
        out: list = [None] * len(images)
        for f in [pool.submit(worker, k, images, out) for k in range(threads)]:
            f.result()
        return np.stack(out)

    return run_many
