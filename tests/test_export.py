import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from convnext_deploy.pipeline.models.checkpoints import load_checkpoint
from convnext_deploy.pipeline.models.convnext import create_model, weight_layers
from convnext_deploy.pipeline.models.graph_forms import DEFAULT_FORM, to_form
from convnext_deploy.pipeline.models.onnx_export import (
    OPSET,
    check_parity,
    export_cached,
    fold_layer_scale,
)

from conftest import randomized


@pytest.fixture(scope="module")
def exported(atto_reference, atto_onnx):
    """The atto reference and the session's export of it (export_onnx through the build cache: the one every deploy
    of the session reads)."""
    return load_checkpoint(atto_reference, "atto").model, atto_onnx


def test_graph_is_checked_dynamic_and_keeps_norms_and_gelu_whole(exported):
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    ops = Counter(n.op_type for n in proto.graph.node)
    # 1 stem + 3 downsample + 12 block norms + 1 head norm, each one node; one Gelu per block
    assert ops["LayerNormalization"] == 17 and ops["Gelu"] == 12
    assert not {"ReduceMean", "Erf"} & {k for k, v in ops.items() if v > 1}
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1] == 3
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1)  # batch, height, width are symbolic


def test_parity_against_eager_torch_at_two_sizes_and_batches(exported):
    import onnxruntime as ort

    model, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, size in ((1, 32), (3, 224)):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4


def test_layer_scale_folding_keeps_the_function():
    model = randomized(create_model("atto", num_classes=10))
    folded = fold_layer_scale(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-5)
    assert all(b.gamma is None for s in folded.stages for b in s.blocks)
    assert all(b.gamma is not None for s in model.stages for b in s.blocks)  # the original is untouched


def test_parity_failure_is_loud(exported, tmp_path):
    model, path = exported
    broken = randomized(create_model("atto", num_classes=10), seed=5)  # other weights than the export
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    with pytest.raises(RuntimeError, match="ONNX export parity failed"):
        check_parity(broken, path, images, tolerance=1e-3)


def test_export_is_cached_by_checkpoint_key(exported, tmp_path, monkeypatch):
    """A key's export runs once; each run of the exporter is the module's export of the same model (copied: the
    export itself is tested above), and parity is checked against the model on every call."""
    from convnext_deploy.pipeline.models import onnx_export

    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    model, path = exported
    log = tmp_path / "runs.txt"  # the export runs in a forked child: it leaves a line, not a list entry

    def export(m, out):
        shutil.copyfile(path, out)
        with log.open("a") as f:
            f.write("run\n")

    monkeypatch.setattr(onnx_export, "export_onnx", export)
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    first = export_cached(model, "a" * 64, "atto", images)
    again = export_cached(model, "a" * 64, "atto", images)
    other = export_cached(model, "b" * 64, "atto", images)
    assert not first.cached and again.cached and not other.cached and log.read_text().count("run") == 2
    assert first.path == again.path != other.path
    assert first.parity.max_abs_diff < 1e-4 and first.parity.top1_agreement == 1.0


def test_channels_first_form_is_the_same_function_without_block_transposes(atto_reference, cli_env, monkeypatch):
    """The second graph form: same logits as the model as defined (γ folded, norms as mean/variance over channels;
    random weights), the checkpoint's layer names in the same network order, and an export (the reference's, in the
    session's build cache) with no Transpose and no MatMul in the blocks (1×1 convolutions), checked for parity
    against the model as defined."""
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", cli_env["CONVNEXT_DEPLOY_CACHE_DIR"])
    model = randomized(create_model("atto", num_classes=10)).eval()
    cf = to_form(model, "channels_first")
    assert to_form(model, DEFAULT_FORM) is model
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        diff = (cf(x) - model(x)).abs().max().item()
    assert diff < 1e-4 * model(x).abs().max().item()
    assert [n for n, _ in weight_layers(cf)] == [n for n, _ in weight_layers(model)]
    images = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    ck = load_checkpoint(atto_reference, "atto")
    cf_export = export_cached(ck.model, ck.sha256, "atto", images, form="channels_first")
    assert cf_export.form == "channels_first" and "channels_first" in (cf_export.path.parent / "export.json").read_text()
    assert cf_export.parity.max_abs_diff < 1e-3 and cf_export.parity.top1_agreement == 1.0
    ops = Counter(n.op_type for n in onnx.load(str(cf_export.path)).graph.node)
    assert ops["Transpose"] == 0 and ops["LayerNormalization"] == 1  # the head's norm: over features, not NCHW
    assert ops["MatMul"] + ops["Gemm"] == 1 and ops["Conv"] == 1 + 3 + 12 * 3  # stem, downsamplings, blocks
    with pytest.raises(ValueError, match="unknown graph form"):
        to_form(model, "nhwc")
