"""preprocessing.json, the bundle's index: how an image becomes the model's input, which file is which model, and
what each runtime must be told to compute what the deploy measured."""
from __future__ import annotations

# What the template and validate must know of a runtime, by target name (the Target contract does not say):
PIL_INPUT = {"coreml"}  # a PIL image in (Core ML ImageType: normalisation inside the package) ...
PROBABILITIES = {"coreml"}  # ... and a classifier's softmax probabilities out (the others give logits)


def output_kind(target: str) -> str:
    return "probabilities" if target in PROBABILITIES else "logits"


def runtime_config(target: str, row: dict, resolved: dict | None = None) -> dict:
    """Settings the runtime must be given to compute what the deploy measured. `resolved`: what the runtime that
    computed the reference outputs resolved (Runner.settings), over what the build asked for: OpenVINO asked for
    bf16 runs f32 on a CPU without BF16, and the device must be told f32, not bf16."""
    if target == "openvino":  # without the hint the CPU plugin picks BF16 where the CPU has it
        return {"INFERENCE_PRECISION_HINT": (row["metadata"].get("build") or {}).get("float_precision", "f32"),
                "PERFORMANCE_HINT": "LATENCY", **(resolved or {})}
    if target == "onnxruntime":
        return {"graph_optimization_level": "ORT_ENABLE_ALL", "providers": ["CPUExecutionProvider"]}
    return {}


def as_configured(target: str, metadata: dict, config: dict) -> dict:
    """An artifact's metadata with the settings preprocessing.json tells the runtime (runtime_config) in place of the
    build's request, so `validate` computes as the reference outputs were computed."""
    if target == "openvino" and "INFERENCE_PRECISION_HINT" in config:
        return {**metadata, "build": {**(metadata.get("build") or {}),
                                      "float_precision": config["INFERENCE_PRECISION_HINT"]}}
    return metadata


def image_input(row: dict) -> bool:
    """Whether an artifact row of report.json takes the uint8 image itself (targets.image_input)."""
    from convnext_deploy.targets import takes_image

    return takes_image(row["metadata"])


def _input(target: str, row: dict, size: int) -> dict:
    """preprocessing.json's input fields: a Core ML image, uint8 pixels, or the float tensor."""
    from convnext_deploy.pipeline.models.onnx_export import INPUT_NAME

    if target in PIL_INPUT:
        return {"normalise": "inside the model (Core ML ImageType scale/bias): feed the cropped RGB image",
                "layout": "image (H×W RGB, uint8)", "dtype": "uint8 image",
                "input": {"name": "image", "type": "image", "shape": [size, size, 3]}}
    dynamic = f"batch and spatial size are dynamic (multiples of 32); accuracy was measured at {size} px"
    if image_input(row):
        return {"normalise": "inside the model: feed the cropped RGB pixels as they are",
                "layout": "NHWC", "dtype": "uint8",
                "input": {"name": INPUT_NAME, "type": "image", "shape": ["batch", size, size, 3], "note": dynamic},
                "inside_the_model": "labels and this input rule: ONNX metadata_props / OpenVINO rt_info, keys "
                                    "convnext_deploy.labels and convnext_deploy.preprocessing"}
    return {"normalise": "x / 255, then (x − mean) / std per channel (R, G, B)", "layout": "NCHW", "dtype": "float32",
            "input": {"name": INPUT_NAME, "type": "tensor", "shape": ["batch", 3, size, size], "note": dynamic}}


def preprocessing_json(report: dict, rows: dict[str, dict], n_classes: int, resolved: dict | None = None) -> dict:
    from PIL import __version__ as pillow

    from convnext_deploy.pipeline.models.onnx_export import OUTPUT_NAME

    target = report["target"]["name"]
    pp = report["model"]["preprocessing"]
    size, short = pp["input_size"], int(pp["input_size"] // pp["crop_pct"])
    pil_in = target in PIL_INPUT
    return {
        "format": "convnext-deploy bundle preprocessing 1",
        "input_size": size, "crop_pct": pp["crop_pct"], "interpolation": pp["interpolation"],
        "mean": pp["mean"], "std": pp["std"],
        "colour_mode": "RGB: every image is converted with Pillow's Image.convert('RGB') before anything else "
                       "(a grey image becomes three equal channels; alpha is dropped, not composited; 16-bit grey is "
                       "first scaled to 8 bits by its top byte, where convert would clip it)",
        "resize": f"shorter side to floor(input_size / crop_pct) = {short} px, the other side to "
                  f"max({short}, round(side × {short} / shorter side)), Pillow Image.resize with "
                  f"{pp['interpolation']} (skipped when the image already has that size)",
        "crop": f"centre {size}×{size}: left = (width − {size}) // 2, top = (height − {size}) // 2",
        **_input(target, rows["int8"], size),
        "output": {"name": None if pil_in else OUTPUT_NAME, "kind": output_kind(target),
                   "shape": ["batch", n_classes], "classes": "labels.txt, one name a line, in output order",
                   **({"note": "the classifier's probability dictionary, keyed by class name "
                               "(spec.description.predictedProbabilitiesName)"} if pil_in else {})},
        "runtime": target,
        "default_model": "int8",
        "models": {p: {"file": r["files"][0], "files": r["files"], "precision": p, "sha256": r["sha256"],
                       "config": runtime_config(target, r, (resolved or {}).get(p))} for p, r in rows.items()},
        "trained_on": report["model"].get("trained_on") or {},
        "reference_made_with": {"pillow": pillow},
    }
