"""Per-layer sensitivity of a Q/DQ INT8 graph: the surgery that leaves layers in float is exact, and a layer
damaged on purpose ranks first."""

import onnx
import pytest
from onnx import numpy_helper

from convnext_deploy.pipeline.decisions.sensitivity import rank_key, run_probe
from convnext_deploy.pipeline.models.convnext import weight_layers
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import BuildRequest, CalibrationData
from convnext_deploy.targets.qdq import layer_probe, quantized_layers

from conftest import copy_onnx, reference_split, run_cli

ort_cpu = get_target("onnxruntime")


@pytest.fixture(scope="module")
def qdq(atto_reference, atto_onnx, tmp_path_factory):
    data = reference_split(atto_reference, n_calib=300, n_eval=100)
    ck, calib_x = data.ck, data.calib_x
    d = tmp_path_factory.mktemp("sens")
    copy_onnx(atto_onnx, d / "model.onnx")
    arts = {}
    for p in ("fp32", "int8"):
        (d / p).mkdir()
        arts[p] = ort_cpu.build(BuildRequest(p, d / "model.onnx", ck.model, d / p, CalibrationData(calib_x, "m", "t"),
                                             options=ort_cpu.make_options()))
    return ck, arts, calib_x[:128], d


def test_sensitivity_ranks_a_damaged_layer_first(qdq):
    ck, arts, images, d = qdq
    model = onnx.load(str(arts["int8"].files[0]))
    layers = quantized_layers(model)
    names = [n for n, _ in weight_layers(ck.model)]
    assert len(layers) == len(names) == 41
    victim = names.index("stages.2.blocks.1.mlp.fc1")
    node = layers[victim]
    producers = {o: n for n in model.graph.node for o in n.output}
    q = producers[producers[node.input[0]].input[0]]
    assert q.op_type == "QuantizeLinear"
    inits = {i.name: i for i in model.graph.initializer}
    scale = numpy_helper.to_array(inits[q.input[1]])
    inits[q.input[1]].CopyFrom(numpy_helper.from_array((scale * 0.02).astype(scale.dtype), q.input[1]))
    damaged = d / "damaged.onnx"
    onnx.save(model, str(damaged))

    def sensitivity(qdq_path):
        probe = layer_probe(qdq_path, arts["fp32"].files[0], images, 2, optimize=True, runtime="test", kind="real")
        assert probe.layers == [n.name for n in layers]
        return run_probe(probe, log=lambda m: None)

    clean, hurt = sensitivity(arts["int8"].files[0]), sensitivity(damaged)
    for r in (clean, hurt):
        assert r["float_graph_max_abs_diff"] < 1e-3  # every layer floated == the FP32 export
    ranked = sorted(range(41), key=lambda i: rank_key(hurt["layers"][i]))
    print(f"\ndamaged {names[victim]}: agreement {hurt['int8_agreement'] * 100:.1f}% (clean "
          f"{clean['int8_agreement'] * 100:.1f}%), its SQNR {hurt['layers'][victim]['sqnr_db']:.1f} dB "
          f"(clean {clean['layers'][victim]['sqnr_db']:.1f} dB), ranked {ranked.index(victim) + 1} of 41")
    assert ranked[0] == victim
    assert hurt["layers"][victim]["sqnr_db"] < clean["layers"][victim]["sqnr_db"] - 10
    # the whole model's logits are noisier for it (top-1 agreement on 128 images may not move: a count of a few)
    assert hurt["logit_sqnr_db"] < clean["logit_sqnr_db"] - 3 and hurt["int8_agreement"] <= clean["int8_agreement"]
    assert hurt["layers"][victim]["logit_sqnr_gain_db"] > 3


def test_sensitivity_command(atto_reference, cli_env, tmp_path):
    # the session's cache: --calib 300 is the TensorRT deploys' (conftest tensorrt_deployed): export and builds shared
    run_cli(["sensitivity", "--target", "tensorrt", "--variant", "atto", "--calib", "300", "--images", "64",
             "--out", str(tmp_path / "s")], cli_env, code=0, timeout=600)
    md = (tmp_path / "s" / "sensitivity.md").read_text()
    assert "proxy for the TensorRT engine" in md and md.count("| stages.") >= 30 and "| stem.0 |" in md
    assert (tmp_path / "s" / "sensitivity.png").stat().st_size > 10_000
    bad = run_cli(["sensitivity", "--target", "onnxruntime", "--variant", "atto", "--images", "0"], cli_env, timeout=120)
    assert bad.returncode == 2 and "--images 0" in bad.stderr and "Traceback" not in bad.stderr


def test_streamed_sums_equal_the_whole_arrays(qdq):
    """The loop reduces chunk by chunk; its per-layer SQNR is the one computed on every image at once."""
    import numpy as np

    from convnext_deploy.pipeline.decisions.sensitivity import sqnr_db

    ck, arts, images, d = qdq
    probe = layer_probe(arts["int8"].files[0], arts["fp32"].files[0], images, 2, optimize=True, runtime="t", kind="real")
    chunks = list(probe.run(set(), probe.layers[:3]))
    assert len(chunks) == 2 and len(chunks[0][0]) == 64  # 128 images at 32 px: two chunks of 64
    whole_q = [np.concatenate(c) for c in zip(*chunks)]
    whole_f = [np.concatenate(c) for c in zip(*probe.run(set(probe.layers), probe.layers[:3]))]
    result = run_probe(probe, log=lambda m: None)
    for i in range(3):
        assert abs(result["layers"][i]["sqnr_db"] - sqnr_db(whole_f[i + 1], whole_q[i + 1])) < 1e-6


def test_probe_memory_is_one_chunk_not_every_image():
    """A probe with 100 chunks of 3 MB of tapped activations: the loop's peak stays a few chunks, where holding
    every image's activations (the old loop) needs 320 MB."""
    import tracemalloc

    import numpy as np

    from convnext_deploy.targets.base import LayerProbe, probe_chunks

    images = np.zeros((200, 3, 224, 224), np.float32)
    assert [len(c) for c in probe_chunks(images)][:2] == [2, 2]  # 224 px: 2 images a chunk
    layers = ["a", "b"]

    def run(floated, tapped):
        rng = np.random.default_rng(len(floated))
        for chunk in probe_chunks(images):
            acts = [rng.standard_normal((len(chunk), 200_000)).astype(np.float32) for _ in tapped]
            yield [rng.standard_normal((len(chunk), 10)).astype(np.float32), *acts]

    tracemalloc.start()
    try:
        result = run_probe(LayerProbe(layers, run, "synthetic", "real"), log=lambda m: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    chunk_bytes = 2 * 2 * 200_000 * 4  # both layers' activations of one chunk
    assert result["images"] == 200 and len(result["layers"]) == 2
    assert peak < 6 * chunk_bytes, f"peak {peak / 2**20:.0f} MiB for {chunk_bytes / 2**20:.0f} MiB chunks"


def test_a_time_budget_probes_the_worst_layers_first_and_ranks_the_rest_by_sqnr(monkeypatch):
    """Each layer's own pass is what grows with the variant (a hundred at ConvNeXt-B): under a budget the worst
    layers by SQNR are probed first, and the rest follow them, by SQNR, in the ranking and the report's table."""
    import numpy as np

    from convnext_deploy.pipeline.decisions import sensitivity as sens
    from convnext_deploy.reports.markdown_page import sensitivity_markdown
    from convnext_deploy.targets.base import LayerProbe

    layers, noise = ["a", "b", "c", "d"], {"a": 0.01, "b": 0.3, "c": 0.1, "d": 0.03}  # worst SQNR: b, c, d, a
    rng = np.random.default_rng(0)
    logits, acts = rng.standard_normal((8, 10)), rng.standard_normal((8, 50))

    def run(floated, tapped):
        shift = sum(0.0 if n in floated else noise[n] for n in layers)
        yield [logits + shift * np.sin(np.arange(10)), *[acts + (0 if n in floated else noise[n]) for n in tapped]]

    clock = iter(range(100))  # one second a call: the budget check before each pass reads one
    monkeypatch.setattr(sens.time, "monotonic", lambda: float(next(clock)))
    res = run_probe(LayerProbe(layers, run, "synthetic", "real"), log=lambda m: None, budget_s=2.5)
    assert res["probed"] == 2 and res["budget_s"] == 2.5
    probed = [r["layer"] for r in res["layers"] if "agreement_regained_pp" in r]
    assert probed == ["b", "c"]  # the two worst by SQNR, in network order
    ranked = [r["layer"] for r in sorted(res["layers"], key=rank_key)]
    assert set(ranked[:2]) == {"b", "c"} and ranked[2:] == ["d", "a"]
    monkeypatch.undo()
    full = run_probe(LayerProbe(layers, run, "synthetic", "real"), log=lambda m: None)
    assert full["probed"] == 4 and all("logit_sqnr_gain_db" in r for r in full["layers"])
    page = sensitivity_markdown({**res, "target": "t", "source": "s", "int8_agreement_with_float": 1.0,
                                 "ranking": ranked})
    assert page.count("not probed (time budget)") == 2 and "2 of 4 layers were probed alone" in page
