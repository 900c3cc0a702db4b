"""OpenVINO's own INT8 path, the way its users take it: the torch module converted by `openvino.convert_model`
(not our ONNX), quantized by `nncf.quantize` with its defaults, and with `ModelType.TRANSFORMER`, on the same
calibration images as ours. The bench times these beside our artifacts; they are saved as IRs that the target's
own `load_runner` compiles with the same settings (static shape, latency hint, threads) and, as its users compile,
no precision hint (the plugin's own choice for the float layers: BF16 on a CPU with AVX-512 BF16 or AMX), so a
ratio compares the graphs and their quantization, not the way they were run.
"""
from __future__ import annotations

import numpy as np

from convnext_deploy.targets.base import Artifact, BuildRequest

NAME = "openvino"
PATHS = (("ov.convert_model + nncf.quantize defaults", None),
         ("ov.convert_model + nncf.quantize model_type=TRANSFORMER", "TRANSFORMER"))


def user_paths(request: BuildRequest) -> dict[str, Artifact]:
    """label → INT8 IR written under `request.out_dir`, one per path of PATHS, from `request.torch_model`."""
    import nncf
    import openvino as ov
    import torch

    images = request.calibration.images
    example = torch.from_numpy(np.ascontiguousarray(images[:1], dtype=np.float32))
    data = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    out = {}
    for i, (label, model_type) in enumerate(PATHS):
        model = ov.convert_model(request.torch_model.eval(), example_input=example)
        kwargs = {"model_type": getattr(nncf.ModelType, model_type)} if model_type else {}
        quantized = nncf.quantize(model, data, **kwargs)
        xml = request.out_dir / f"peer_{i}_int8.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        out[label] = Artifact(NAME, "int8", [xml, xml.with_suffix(".bin")],
                              {"build": {"float_precision": None}, "converted_from": "torch (openvino.convert_model)",
                               "path": label, "nncf": {"model_type": model_type or "default", "subset_size": "default"}})
    return out
