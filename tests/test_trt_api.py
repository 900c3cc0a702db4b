"""The TensorRT build against TensorRT's documented Python API, without TensorRT: every `tensorrt` name the target's
code reaches is one NVIDIA documents for the whole supported range, none is one 11.x removed, the pinned range is the
same everywhere, and the engine build, walked with a stand-in module, asks for a strongly typed network, sets no
precision flag and publishes its settings atomically."""
import ast
import json
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest

from convnext_deploy.targets import trt_engine, trt_gpu

from conftest import REPO

TRT_MODULES = [REPO / "targets" / "trt_engine.py", REPO / "targets" / "trt_gpu.py", REPO / "targets" / "trt_onnx.py"]
MODULE = "tensorrt"

# Names NVIDIA documents in every release of the supported range, 10.12 through 11.x: the Python API reference
# (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html and its sibling
# pages Core/BuilderConfig, Core/Network, Core/Engine, Core/ExecutionContext, Core/Runtime, Core/Logger,
# Core/TimingCache, parsers/Onnx/pyOnnx; 11.x: https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/
# infer/Core/Builder.html ...). Those pages are generated from the bindings' docstrings in NVIDIA/TensorRT
# python/src (tags v10.12.0 … v11.1): each list is the members bound in all of them, less those the 11.x migration
# guide removes (BuilderFlag.DIRECT_IO is still bound in 11 but listed there as removed). Logger holds ILogger's
# Severity values, which the bindings export into the logger's scope (`trt.Logger.WARNING`).
DOCUMENTED = {
    MODULE: """APILanguage ActivationType AllocatorFlag BoundingBoxFormat Builder BuilderFlag CumulativeOperation
        DataType DeviceType DimensionOperation Dims Dims2 Dims3 Dims4 DimsExprs DimsHW DynamicPluginTensorDesc
        ElementWiseOperation EngineCapability EngineInspector ErrorCode ErrorCodeTRT
        ExecutionContextAllocationStrategy FallbackString FillOperation GatherMode HardwareCompatibilityLevel
        IActivationLayer IAssertionLayer IBuilderConfig ICastLayer IConcatenationLayer IConditionLayer
        IConstantLayer IConvolutionLayer ICudaEngine ICumulativeLayer IDebugListener IDeconvolutionLayer
        IDequantizeLayer IDimensionExpr IDynamicQuantizeLayer IEinsumLayer IElementWiseLayer IErrorRecorder
        IExecutionContext IExprBuilder IFillLayer IGatherLayer IGpuAllocator IGpuAsyncAllocator IGridSampleLayer
        IHostMemory IIdentityLayer IIfConditional IIfConditionalBoundaryLayer IIfConditionalInputLayer
        IIfConditionalOutputLayer IIteratorLayer ILRNLayer ILayer ILoop ILoopBoundaryLayer ILoopOutputLayer
        IMatrixMultiplyLayer INMSLayer INetworkDefinition INonZeroLayer INormalizationLayer IOneHotLayer
        IOptimizationProfile IOutputAllocator IPaddingLayer IParametricReLULayer IPluginCapability IPluginCreator
        IPluginCreatorInterface IPluginCreatorV3One IPluginCreatorV3Quick IPluginRegistry IPluginResource
        IPluginResourceContext IPluginV2 IPluginV2DynamicExt IPluginV2DynamicExtBase IPluginV2Ext IPluginV2Layer
        IPluginV3 IPluginV3Layer IPluginV3OneBuild IPluginV3OneBuildV2 IPluginV3OneCore IPluginV3OneRuntime
        IPluginV3QuickAOTBuild IPluginV3QuickBuild IPluginV3QuickCore IPluginV3QuickRuntime IPoolingLayer IProfiler
        IProgressMonitor IQuantizeLayer IRaggedSoftMaxLayer IRecurrenceLayer IReduceLayer IResizeLayer
        IReverseSequenceLayer IRuntimeConfig IScaleLayer IScatterLayer ISelectLayer ISerializationConfig IShapeLayer
        IShuffleLayer ISliceLayer ISoftMaxLayer ISqueezeLayer IStreamReaderV2 ISymExpr ISymExprs ITensor
        ITimingCache ITopKLayer ITripLimitLayer IUnaryLayer IUnsqueezeLayer IVersionedInterface InterfaceInfo
        InterpolationMode KernelLaunchParams LayerInformationFormat LayerType Logger LoopOutput MatrixOperation
        MemoryPoolType NetworkDefinitionCreationFlag OnnxParser OnnxParserFlag OnnxParserRefitter PaddingMode
        ParserError Permutation PluginArgDataType PluginArgType PluginCapabilityType PluginCreatorVersion
        PluginField PluginFieldCollection_ PluginFieldType PluginTensorDesc PoolingType PreviewFeature Profiler
        ProfilingVerbosity QuickPluginCreationRequest ReduceOperation Refitter ResizeCoordinateTransformation
        ResizeRoundMode ResizeSelector Runtime RuntimePlatform SampleMode ScaleMode ScatterMode SeekPosition
        SerializationFlag Severity TacticSource TempfileControlFlag TensorFormat TensorIOMode TensorLocation
        TensorRTPhase TilingOptimizationLevel TimingCacheKey TimingCacheValue TopKOperation TripLimit UnaryOperation
        Weights WeightsRole __version__ bfloat16 bool e8m0 float16 float32 fp4 fp8 get_builder_plugin_registry
        get_nv_onnx_parser_version get_plugin_registry init_libnvinfer_plugins int32 int4 int64 int8 uint8""",
    "Logger": """ERROR INFO INTERNAL_ERROR VERBOSE WARNING log min_severity""",
    "Builder": """build_engine_with_config build_serialized_network create_builder_config create_network
        create_optimization_profile error_recorder get_plugin_registry gpu_allocator is_network_supported logger
        max_DLA_batch_size max_threads num_DLA_cores reset""",
    "IBuilderConfig": """DLA_core add_optimization_profile avg_timing_iterations builder_optimization_level
        can_run_on_DLA clear_flag create_timing_cache default_device_type engine_capability flags get_device_type
        get_flag get_memory_pool_limit get_preview_feature get_tactic_sources get_timing_cache
        hardware_compatibility_level is_device_type_set l2_limit_for_tiling max_aux_streams max_num_tactics
        num_optimization_profiles plugins_to_serialize profile_stream profiling_verbosity progress_monitor reset
        reset_device_type runtime_platform set_device_type set_flag set_memory_pool_limit set_preview_feature
        set_tactic_sources set_timing_cache tiling_optimization_level""",
    "INetworkDefinition": """add_activation add_assertion add_cast add_concatenation add_constant
        add_convolution_nd add_cumulative add_deconvolution_nd add_dequantize add_dynamic_quantize add_einsum
        add_elementwise add_fill add_gather add_gather_v2 add_grid_sample add_identity add_if_conditional add_input
        add_loop add_lrn add_matrix_multiply add_nms add_non_zero add_normalization add_one_hot add_padding_nd
        add_parametric_relu add_plugin add_plugin_v2 add_plugin_v3 add_pooling_nd add_quantize add_ragged_softmax
        add_reduce add_resize add_reverse_sequence add_scale add_scale_nd add_scatter add_select add_shape
        add_shuffle add_slice add_softmax add_squeeze add_topk add_unary add_unsqueeze are_weights_marked_refittable
        builder error_recorder flags get_flag get_input get_layer get_output has_implicit_batch_dimension
        is_debug_tensor mark_debug mark_output mark_output_for_shapes mark_unfused_tensors_as_debug_tensors
        mark_weights_refittable name num_inputs num_layers num_outputs remove_tensor serialize set_weights_name
        unmark_debug unmark_output unmark_output_for_shapes unmark_unfused_tensors_as_debug_tensors
        unmark_weights_refittable""",
    "ITensor": """allowed_formats broadcast_across_batch dtype get_dimension_name is_execution_tensor
        is_network_input is_network_output is_shape_tensor location name set_dimension_name shape""",
    "OnnxParser": """clear_errors clear_flag flags get_error get_flag get_layer_output_tensor get_subgraph_nodes
        get_used_vc_plugin_libraries is_subgraph_supported num_errors num_subgraphs parse parse_from_file set_flag
        supports_model_v2 supports_operator""",
    "ParserError": """code desc file func line local_function_stack local_function_stack_size node node_name
        node_operator""",
    "IOptimizationProfile": """extra_memory_target get_shape get_shape_input set_shape set_shape_input""",
    "ITimingCache": """combine query queryKeys reset serialize update""",
    "IHostMemory": """dtype nbytes""",
    "Runtime": """DLA_core deserialize_cuda_engine engine_host_code_allowed error_recorder get_plugin_registry
        gpu_allocator load_runtime logger max_threads num_DLA_cores tempfile_control_flags temporary_directory""",
    "ICudaEngine": """create_engine_inspector create_execution_context create_runtime_config
        create_serialization_config device_memory_size_v2 engine_capability error_recorder
        get_device_memory_size_for_profile_v2 get_tensor_bytes_per_component get_tensor_components_per_element
        get_tensor_dtype get_tensor_format get_tensor_format_desc get_tensor_location get_tensor_mode
        get_tensor_name get_tensor_profile_shape get_tensor_profile_values get_tensor_shape
        get_tensor_vectorized_dim get_weight_streaming_automatic_budget hardware_compatibility_level is_debug_tensor
        is_shape_inference_io name num_aux_streams num_io_tensors num_layers num_optimization_profiles
        profiling_verbosity refittable serialize serialize_with_config streamable_weights_size tactic_sources
        weight_streaming_budget_v2 weight_streaming_scratch_memory_size""",
    "IExecutionContext": """active_optimization_profile all_binding_shapes_specified debug_sync device_memory
        engine enqueue_emits_profile error_recorder execute_async_v3 execute_v2 get_debug_listener get_debug_state
        get_input_consumed_event get_max_output_size get_output_allocator get_runtime_config get_tensor_address
        get_tensor_shape get_tensor_strides infer_shapes name nvtx_verbosity persistent_cache_limit profiler
        report_to_profiler set_all_tensors_debug_state set_aux_streams set_debug_listener set_device_memory
        set_input_consumed_event set_input_shape set_optimization_profile_async set_output_allocator
        set_tensor_address set_tensor_debug_state temporary_allocator unfused_tensors_debug_state
        update_device_memory_size_for_shapes""",
    "TensorIOMode": """INPUT NONE OUTPUT""",
    "DataType": """BF16 BOOL E8M0 FLOAT FP4 FP8 HALF INT32 INT4 INT64 INT8 UINT8 itemsize""",
    "MemoryPoolType": """DLA_GLOBAL_DRAM DLA_LOCAL_DRAM DLA_MANAGED_SRAM TACTIC_DRAM TACTIC_SHARED_MEMORY
        WORKSPACE""",
    "NetworkDefinitionCreationFlag": """PREFER_AOT_PYTHON_PLUGINS PREFER_JIT_PYTHON_PLUGINS STRONGLY_TYPED""",
    "BuilderFlag": """DEBUG DISABLE_COMPILATION_CACHE DISABLE_TIMING_CACHE DISTRIBUTIVE_INDEPENDENCE
        EDITABLE_TIMING_CACHE ERROR_ON_TIMING_CACHE_MISS EXCLUDE_LEAN_RUNTIME GPU_FALLBACK MONITOR_MEMORY REFIT
        REFIT_IDENTICAL REFIT_INDIVIDUAL SAFETY_SCOPE SPARSE_WEIGHTS STRICT_NANS STRIP_PLAN TF32 VERSION_COMPATIBLE
        WEIGHT_STREAMING""",
}
# NVIDIA's "Migrating from TensorRT 10.x to 11.x", Removed Python APIs and Replacements
# (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html)
REMOVED_IN_11 = {
    "BuilderFlag": {"FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"},
    "IBuilderConfig": {"int8_calibrator", "set_calibration_profile", "get_calibration_profile", "set_quantization_flag",
                       "get_quantization_flag", "quantization_flags", "clear_quantization_flag"},
    "Builder": {"platform_has_fast_fp16", "platform_has_fast_int8"},
    "ICudaEngine": {"device_memory_size", "get_device_memory_size_for_profile"},
}
# What a call returns, where it is a TensorRT object whose own names are then checked too.
RETURNS = {
    ("Builder", "create_network"): "INetworkDefinition", ("Builder", "create_builder_config"): "IBuilderConfig",
    ("Builder", "create_optimization_profile"): "IOptimizationProfile",
    ("Builder", "build_serialized_network"): "IHostMemory",
    ("IBuilderConfig", "create_timing_cache"): "ITimingCache", ("IBuilderConfig", "get_timing_cache"): "ITimingCache",
    ("INetworkDefinition", "get_input"): "ITensor", ("INetworkDefinition", "get_output"): "ITensor",
    ("OnnxParser", "get_error"): "ParserError", ("Runtime", "deserialize_cuda_engine"): "ICudaEngine",
    ("ICudaEngine", "create_execution_context"): "IExecutionContext",
}


def _type_of(expr, env: dict):
    """The TensorRT class an expression evaluates to (the module itself, a class or enum, an instance), or None."""
    if isinstance(expr, ast.Name):
        return env.get(expr.id)
    if isinstance(expr, ast.Attribute):  # a class or enum of the module (CamelCase), not `__version__`
        return expr.attr if _type_of(expr.value, env) == MODULE and expr.attr[:1].isupper() else None
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        owner = _type_of(expr.func.value, env)
        return _type_of(expr.func, env) if owner == MODULE else RETURNS.get((owner, expr.func.attr))
    return None


class _Uses(ast.NodeVisitor):
    """(class, name, line) of every attribute reached on the tensorrt module (imported, or a parameter named `trt`)
    and on what its classes and factories return, followed through assignments in source order."""

    def __init__(self):
        self.env, self.found = {}, []

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name == MODULE:
                self.env[alias.asname or alias.name] = MODULE

    def visit_FunctionDef(self, node):
        for arg in node.args.args + node.args.kwonlyargs:
            self.env[arg.arg] = MODULE if arg.arg == "trt" else None
        self.generic_visit(node)

    def visit_Assign(self, node):
        self.visit(node.value)
        for target in node.targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            for t in names:
                if isinstance(t, ast.Name):
                    self.env[t.id] = _type_of(node.value, self.env) if t is target else None
                else:
                    self.visit(t)

    def visit_Attribute(self, node):
        owner = _type_of(node.value, self.env)
        if owner is not None:
            self.found.append((owner, node.attr, node.lineno))
        self.generic_visit(node)


def tensorrt_uses(path) -> list[tuple[str, str, int]]:
    visitor = _Uses()
    visitor.visit(ast.parse(path.read_text()))
    return visitor.found


def test_the_walk_sees_the_engine_build():
    """The check is only as good as what it finds: the build's own calls must be among them."""
    used = {(c, n) for c, n, _ in tensorrt_uses(REPO / "targets" / "trt_engine.py")}
    assert {(MODULE, "Builder"), ("Builder", "create_network"), ("IBuilderConfig", "set_memory_pool_limit"),
            ("ITimingCache", "serialize"), ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"), ("ITensor", "name"),
            ("IExecutionContext", "execute_async_v3"), ("TensorIOMode", "INPUT"), ("Logger", "WARNING")} <= used


@pytest.mark.parametrize("path", TRT_MODULES, ids=lambda p: p.name)
def test_every_tensorrt_name_is_documented_from_10_12_through_11(path):
    documented = {k: set(v.split()) for k, v in DOCUMENTED.items()}
    for owner, name, line in tensorrt_uses(path):
        where = f"{path.name}:{line}: {owner}.{name}"
        assert owner in documented, f"{where}: add the documented names of tensorrt.{owner} to DOCUMENTED"
        assert name in documented[owner], f"{where} is not documented for all of {trt_engine.SUPPORTED_TENSORRT}"
        assert name not in REMOVED_IN_11.get(owner, ()), f"{where} was removed in TensorRT 11"


def test_no_weak_typing_and_the_lists_agree():
    used = {(c, n) for p in TRT_MODULES for c, n, _ in tensorrt_uses(p)}
    assert not used & {("BuilderFlag", "FP16"), ("BuilderFlag", "INT8")}
    assert not any(c == "BuilderFlag" for c, _ in used)  # a strongly typed build sets no precision flag at all
    for owner, removed in REMOVED_IN_11.items():
        assert not removed & set(DOCUMENTED[owner].split()), owner


def test_the_supported_range_is_pinned_alike_everywhere():
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tensorrt"]
    constraints = [ln.strip() for ln in (REPO / "constraints.txt").read_text().splitlines()
                   if ln.startswith("tensorrt")]
    assert trt_engine.SUPPORTED_TENSORRT in extra and constraints == [trt_engine.SUPPORTED_TENSORRT]
    assert [trt_engine.supported(v) for v in ("10.11.0.33", "10.12.0.36", "10.16.1", "11.0.0", "11.4.1", "12.0.0")] \
        == [False, True, True, True, True, False]
    assert trt_engine.SUPPORTED_TENSORRT in trt_gpu.INSTALL_HINT


def test_network_flags_ask_for_strong_typing_on_10_and_nothing_on_11():
    flag = SimpleNamespace(STRONGLY_TYPED=1)  # its value in TensorRT 10's enum (EXPLICIT_BATCH is 0)
    assert trt_engine.network_flags(SimpleNamespace(__version__="10.12.0.36", NetworkDefinitionCreationFlag=flag)) == 2
    # 11.x: the flag is a deprecated no-op, not even looked up (a later release may drop it)
    assert trt_engine.network_flags(SimpleNamespace(__version__="11.1.0")) == 0


@pytest.mark.parametrize("version, flags", [("10.12.0.36", 2), ("11.1.0", 0)])
def test_engine_build_walked_with_a_stand_in_tensorrt(version, flags, tmp_path, monkeypatch):
    """build_engine against a stand-in module: the network is strongly typed, no builder flag is set, and the
    engine and its settings are each published through a temporary file and a rename."""
    from convnext_deploy.pipeline.core import cache

    trt = MagicMock(__version__=version)
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 1
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = b"engine"
    cfg = builder.create_builder_config.return_value
    cfg.get_timing_cache.return_value.serialize.return_value = b"cache"
    trt.OnnxParser.return_value.parse.return_value = True
    builder.create_network.return_value.get_input.return_value.name = "input"
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    published = []
    real = cache.publish_file
    monkeypatch.setattr(cache, "publish_file", lambda final, write: published.append(final.name) or real(final, write))
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    options = trt_gpu.TensorRTOptions()
    trt_engine.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "int8", options, (32, 224),
                            tmp_path / "timing.cache")
    builder.create_network.assert_called_once_with(flags)
    cfg.set_flag.assert_not_called()
    assert published == ["m.engine", "timing.cache", "m.json"]
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["network"] == "strongly typed" and written["precision"] == "int8" and written["tensorrt"] == version
    assert written["profile"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 224, 224], "max": [32, 3, 224, 224]}
    assert (tmp_path / "m.engine").read_bytes() == b"engine" and not list(tmp_path.glob(".*.tmp"))
