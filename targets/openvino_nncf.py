"""The OpenVINO target's INT8: NNCF post-training quantization of the converted model, its recipes, the layers
the accuracy fallback keeps in float (NNCF's ignored scope) and NNCF's own accuracy control.

Belongs to targets.openvino_cpu, which alone calls it. NNCF and OpenVINO are imported inside the functions.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from convnext_deploy.targets.base import BuildRequest, calibration_record

PEER_DEFAULT = "nncf.quantize defaults"  # nncf.quantize(model, dataset) with nothing else set: the peer
PEER_SUBSET_SIZE = 300  # nncf.quantize's own default subset_size
WEIGHT_OPS = ("Convolution", "GroupConvolution", "MatMul")


def weight_ops(model) -> list:
    """The Convolution/GroupConvolution/MatMul ops with a constant weight, in network order: the checkpoint's
    Conv/Linear layers (the export keeps their order)."""
    return [op for op in model.get_ordered_ops() if op.get_type_name() in WEIGHT_OPS
            and not _is_activation(op.input_value(1).get_node())]


def layer_names_for(model, torch_model, modules: list[str]) -> list[str]:
    """OpenVINO op names of the named checkpoint layers in a float model (network order, count checked)."""
    from convnext_deploy.pipeline.models.convnext import map_by_network_order

    return map_by_network_order([op.get_friendly_name() for op in weight_ops(model)], torch_model, modules,
                                "OpenVINO model")


def _is_activation(node) -> bool:
    """False for a weight: a Constant, or a chain of Convert/Multiply/Subtract/Reshape/FakeQuantize over one."""
    while node.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape", "FakeQuantize", "Transpose"):
        node = node.input_value(0).get_node()
    return node.get_type_name() != "Constant"


def quantized_layers(model) -> list[str]:
    """Names of the layers whose inputs pass through a FakeQuantize (what runs in INT8)."""
    out = []
    for op in model.get_ops():
        if op.get_type_name() in WEIGHT_OPS and any(
                inp.get_source_output().get_node().get_type_name() == "FakeQuantize" for inp in op.inputs()):
            out.append(op.get_friendly_name())
    return out


def _nncf_kwargs(options, names: list[str], n_calibration: int) -> dict:
    """nncf.quantize's arguments for our recipe (`options`: the target's OpenVINOOptions); `names`: OpenVINO op
    names kept in float."""
    import nncf

    kwargs = {"subset_size": min(int(options.subset_size), n_calibration),
              "fast_bias_correction": bool(options.fast_bias_correction), "target_device": nncf.TargetDevice.CPU}
    if options.preset:
        kwargs["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                            "mixed": nncf.QuantizationPreset.MIXED}[options.preset]
    if options.model_type == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if options.ignored_types or names:
        kwargs["ignored_scope"] = nncf.IgnoredScope(types=list(options.ignored_types), names=list(names))
    if options.overflow_fix:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix(options.overflow_fix))
    return kwargs


def quantize_int8(model, request: BuildRequest, options, meta: dict):
    """The INT8 model of `request` (`options`: the target's OpenVINOOptions), its record written into `meta`: the
    peer's recipe or ours, then NNCF's accuracy control where asked for."""
    import nncf
    import openvino as ov

    calibration = calibration_record(request.calibration)
    n_calib = len(request.calibration.images)
    calib = nncf.Dataset(list(request.calibration.batches(1)))
    floated = layer_names_for(model, request.torch_model, list(options.float_layers)) if options.float_layers else []
    if options.recipe == PEER_DEFAULT:
        scope = {"ignored_scope": nncf.IgnoredScope(names=floated)} if floated else {}
        plain = nncf.quantize(model, calib, subset_size=min(PEER_SUBSET_SIZE, n_calib), **scope)
    else:
        plain = nncf.quantize(model, calib, **_nncf_kwargs(options, floated, n_calib))
    model, reverted = plain, []
    if options.recipe != PEER_DEFAULT and options.accuracy_control is not None:
        if request.validation is None:
            raise ValueError("accuracy control needs a labelled validation set")
        model, reverted = _accuracy_controlled(ov.convert_model(str(request.onnx_path)), calib, request, options,
                                               floated, plain)
        meta["accuracy_control"] = {"max_drop": float(options.accuracy_control),
                                    "control_images": len(request.validation.images),
                                    "control_ids_sha256": request.validation.ids_sha256}
    meta["quantized_layers"] = len(quantized_layers(model))
    meta["reverted_to_float"] = reverted
    meta["float_layers"] = dict(zip(options.float_layers, floated))
    meta["ops"] = dict(Counter(op.get_type_name() for op in model.get_ops() if op.get_type_name() != "Constant"))
    meta["calibration"] = calibration
    return model


def _accuracy_controlled(model, calib, request: BuildRequest, options, floated: list[str],
                         plain) -> tuple[object, list[str]]:
    """nncf.quantize_with_accuracy_control on the labelled control split; returns the model and the op names
    it returned to float (quantized in `plain`, not in the result)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    val = request.validation
    items = [(val.images[i:i + 1], int(val.labels[i])) for i in range(len(val.images))]

    def validate(compiled, data) -> tuple[float, list[float]]:
        # NNCF passes the whole set or a ranking subset; per-sample scores let it rank layers cheaply
        out = compiled.output(0)
        scores = [float(compiled(x)[out].argmax(1)[0] == y) for x, y in data]
        return float(np.mean(scores)), scores

    restorer = AdvancedAccuracyRestorerParameters(
        max_num_iterations=int(options.accuracy_control_max_iterations or 2**31),
        ranking_subset_size=min(int(options.accuracy_control_ranking_subset or 300), len(items)))
    controlled = nncf.quantize_with_accuracy_control(
        model, calib, nncf.Dataset(items), validation_fn=validate, max_drop=float(options.accuracy_control),
        drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer,
        **_nncf_kwargs(options, floated, len(request.calibration.images)))
    before, after = set(quantized_layers(plain)), set(quantized_layers(controlled))
    return controlled, sorted(before - after)
