"""The deploy's stages one by one, in process, on the atto reference (ONNX Runtime): what each returns."""
import gc
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.stages import gates
from convnext_deploy.pipeline.stages import validate as validate_stage
from convnext_deploy.pipeline.stages.build import build, build_one, drop_modules, let_go
from convnext_deploy.pipeline.stages.context import DeployConfig
from convnext_deploy.pipeline.stages.decide import decide
from convnext_deploy.pipeline.stages.export import export, formed
from convnext_deploy.pipeline.stages.finish import finish
from convnext_deploy.pipeline.stages.prepare import prepare
from convnext_deploy.pipeline.stages.report import assemble, publish
from convnext_deploy.pipeline.stages.validate import validate
from convnext_deploy.targets import takes_image

from conftest import GATES_ACCURACY_ONLY, TEST_LOADS, TEST_TIMING_BUDGET_S, run_cli


@pytest.fixture(scope="module")
def staged(atto_reference, cli_env, tmp_path_factory):
    """prepare → export → build with the session's build cache (the CLI deploy fixture's builds are reused)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CONVNEXT_DEPLOY_CACHE_DIR", cli_env["CONVNEXT_DEPLOY_CACHE_DIR"])
    gates = tmp_path_factory.mktemp("gates") / "gates.toml"
    gates.write_text(GATES_ACCURACY_ONLY)
    lines = []
    cfg = DeployConfig("onnxruntime", "atto", n_calib=300, n_eval=1000, gates=gates, alternatives=False, latency_runs=5,
                       batch_sizes=(1,),
                       timing_budget_s=float(TEST_TIMING_BUDGET_S), loads=int(TEST_LOADS))
    ctx = prepare(cfg, lines.append)
    src = export(ctx)
    built = build(ctx, src)
    yield ctx, src, built, lines
    mp.undo()


def test_prepare_gives_a_disjoint_split_and_typed_options(staged):
    ctx, *_ = staged
    s = ctx.split
    assert len(s.calibration) == 300 and len(s.evaluation) == 1000 and len(s.control) == 1000
    assert s.evaluation.source == s.control.source == "fashion-mnist/test"
    assert not set(s.evaluation.indices) & set(s.control.indices)  # the control split is held out of evaluation
    assert ctx.calibration.images.shape == (300, 3, 32, 32) and ctx.control.images.shape == (1000, 3, 32, 32)
    assert ctx.control.ids_sha256 == s.control.ids_sha256 and ctx.fallback_on
    assert type(ctx.options).__name__ == "OrtOptions" and ctx.options.float_layers == ()
    assert ctx.sizes == (32, 224)


def test_an_option_the_target_does_not_have_is_a_user_error(staged, tmp_path):
    ctx, *_ = staged
    with pytest.raises(UserError, match="target onnxruntime has no build option 'preset'"):
        prepare(replace(ctx.cfg, options={"preset": "mixed"}), lambda m: None)


def test_export_gives_the_checkpoint_and_the_smoothed_source(staged):
    _, src, _, _ = staged
    assert src.export.parity.top1_agreement == 1.0 and src.plain.onnx_path == src.export.path
    assert src.int8.onnx_path != src.plain.onnx_path and src.int8.model is not src.plain.model
    assert src.smoothing["alpha"] == 0.5 and src.smoothing["outlier_ratio_after"] < src.smoothing["outlier_ratio_before"]


def test_parity_runs_on_as_many_images_as_the_model_s_cost_allows(staged):
    """atto at 32 px: the most (32); ConvNeXt-S at 224 px (8.7 G multiply-accumulates an image): 17; never fewer
    than 4 however large the model."""
    from types import SimpleNamespace

    from convnext_deploy.pipeline.models.convnext import ConvNeXt
    from convnext_deploy.pipeline.stages.export import PARITY_IMAGES, PARITY_MACS, parity_images

    ctx, src, _, _ = staged
    assert len(parity_images(ctx)) == src.export.parity.n == PARITY_IMAGES[1] == 32
    small = ConvNeXt((3, 3, 27, 3), (96, 192, 384, 768))

    def at(size: int) -> int:
        return len(parity_images(SimpleNamespace(
            ck=SimpleNamespace(model=small, preprocessing=SimpleNamespace(input_size=size)),
            calibration=SimpleNamespace(images=np.zeros((100, 3, 1, 1), np.float32)))))

    assert at(224) == 17 and 17 * 8.68e9 <= PARITY_MACS
    assert at(1024) == PARITY_IMAGES[0] == 4  # 180 G an image: the floor


def test_the_smoothed_model_shares_the_tensors_smoothing_leaves_alone(staged):
    """Held beside the checkpoint's model to the end of a deploy: only the norms and the layers they feed are its own."""
    ctx, src, _, _ = staged
    own, smoothed = dict(src.plain.model.named_parameters()), dict(src.int8.model.named_parameters())
    assert own.keys() == smoothed.keys()
    shared = {k for k in own if smoothed[k] is own[k]}
    assert "stages.3.blocks.1.mlp.fc2.weight" in shared and "stages.0.blocks.0.conv_dw.weight" in shared
    for k in ("stages.3.blocks.1.norm.weight", "stages.3.blocks.1.norm.bias", "stages.3.blocks.1.mlp.fc1.weight"):
        assert k not in shared and not torch.equal(own[k], smoothed[k])  # migrated, in a tensor of its own
    assert sum(own[k].numel() for k in shared) > 0.4 * sum(p.numel() for p in own.values())
    x = torch.from_numpy(ctx.calibration.images[:8])
    with torch.no_grad():  # the same function: the checkpoint's model is untouched by the migration
        assert torch.allclose(src.plain.model(x), src.int8.model(x), atol=1e-4)


def test_build_is_cached_by_everything_it_depends_on(staged):
    ctx, src, built, lines = staged
    assert set(built.artifacts) == {"fp32", "int8"} and set(built.runners) == {"fp32", "int8"}
    again = []
    art = build_one(replace(ctx, log=again.append), src.int8, "int8", ctx.options)
    assert again and "cached" in again[-1] and art.files[0] == built.artifacts["int8"].files[0]
    floated = build_one(replace(ctx, log=again.append), src.int8, "int8",
                        replace(ctx.options, float_layers=("stages.3.blocks.1.mlp.fc2",)))
    assert "built" in again[-1] and floated.files[0].parent != art.files[0].parent
    assert floated.metadata["quantization"]["float_layers"] == ["stages.3.blocks.1.mlp.fc2"]
    assert floated.metadata["ops"]["float_conv_matmul_left"] == 1  # exactly that layer stayed float


def test_decide_keeps_plain_int8_when_it_meets_the_gates(staged):
    ctx, src, built, _ = staged
    decision = decide(ctx, built)
    assert decision.recipe["chosen"] == "ours (default)" and len(decision.recipe["candidates"]) == 1
    assert decision.recipe["int8_pays"] == (decision.recipe["candidates"][0]["speedup"] > 1.0)
    fb = decision.fallback
    assert fb["control"]["n"] == 1000 and fb["bound_pp"] == 1.0 and fb["min_agreement"] == 0.97
    assert fb["plain_control"]["control_agreement_low"] < fb["plain_control"]["control_agreement"]
    if fb["triggered"]:  # INT8 numerics differ per CPU; when the plain model misses, the decision must act
        assert decision.int8 is not None or not fb["met"]
    else:
        # the latency-aware step may keep layers in float where that was measurably faster on this CPU
        kept = decision.recipe["mixed"] is not None and decision.recipe["mixed"]["kept"]
        assert (decision.int8 is not None) == kept and decision.plain_runner is None and fb["float_layers"] == []


def test_decide_does_nothing_without_an_accuracy_gate(staged, tmp_path):
    ctx, src, built, _ = staged
    assert decide(replace(ctx, fallback_on=False), built).fallback is None


@pytest.fixture(scope="module")
def validated(staged):
    ctx, src, built, _ = staged
    decision = decide(ctx, built)
    if decision.int8 is not None:  # as the deploy does: the decision's artifact replaces the default INT8
        built = replace(built, artifacts={**built.artifacts, "int8": decision.int8},
                        runners={**built.runners, "int8": decision.int8_runner})
    shipped = finish(ctx, own(built))
    return ctx, src, shipped, decision, validate(ctx, shipped, decision)


def own(built):
    """`built` with a runners dict of its own: finish lets the given one's sessions go, as the deploy hands it over."""
    return replace(built, runners=dict(built.runners))


def test_finish_ships_image_input_by_default_and_the_tensor_when_asked(staged):
    ctx, _, built, _ = staged
    given = own(built)
    shipped = finish(ctx, given)
    assert not given.runners  # the sessions of the artifacts as built were let go before the finished ones loaded
    assert set(shipped.artifacts) == set(built.artifacts) and shipped.finished_from == built.artifacts
    for p, art in shipped.artifacts.items():
        assert takes_image(art) and not takes_image(built.artifacts[p])
        assert art.metadata["input"]["layout"] == "NHWC" and shipped.runners[p].feed is not None
        assert shipped.runners[p].run(ctx.control.images[:2]).shape == (2, 10)  # still fed the deploy's batches
    tensor = finish(replace(ctx, cfg=replace(ctx.cfg, input="tensor")), own(built))
    for art in tensor.artifacts.values():
        assert not takes_image(art) and art.metadata["input"]["layout"] == "NCHW"
        assert art.files[0].parent != built.artifacts[art.precision].files[0].parent  # labels written into a copy


def test_let_go_lets_the_held_sessions_go_and_loads_one_when_run(staged):
    """What validation does before timing fresh loads: no session of the runners it was given stays held."""
    ctx, _, built, _ = staged
    mine = replace(built, runners={p: ctx.target.load_runner(a, ctx.cfg.threads) for p, a in built.artifacts.items()},
                   recipes={})
    x = ctx.control.images[:4]
    before = {p: r.run(x) for p, r in mine.runners.items()}
    held = {p: weakref.ref(r) for p, r in mine.runners.items()}
    described = {p: (r.runtime, r.precision, r.ops) for p, r in mine.runners.items()}
    let_go(ctx, mine)
    gc.collect()
    assert all(ref() is None for ref in held.values())  # nothing else kept them (or their sessions) alive
    for p, r in mine.runners.items():
        assert (r.runtime, r.precision, r.ops) == described[p]  # what a runner says of itself stays for the report
        np.testing.assert_array_equal(r.run(x), before[p])  # and it runs again, on a session loaded when asked


def test_a_rebuild_in_the_decisions_forks_with_no_session_held(staged, monkeypatch):
    """The latency-aware step's rebuild runs in a forked child, whose peak adds to what the deploy holds: the
    reference's session, held by the runners and by the control split's evidence alike, is let go before it (OpenVINO
    L's decide held FP32 and INT8 sessions beside it: 7.9 GiB), and loaded again when the evidence next runs it."""
    from convnext_deploy.pipeline.decisions import mixed
    from convnext_deploy.pipeline.stages.context import DEFAULT
    from convnext_deploy.pipeline.stages.decide import evidence

    ctx, src, _, _ = staged
    built = build(ctx, src)  # a Built of this test's own: the module's is shared
    ev = evidence(ctx, built)
    x = ctx.control.images[:4]
    before = ev.reference.run(x)
    box = next(b for r, b in built.held if r is ev.reference)
    session = weakref.ref(box[0])
    layer = mixed.weight_layers(ctx.ck.model)[0][0]
    monkeypatch.setattr(mixed, "layer_times", lambda *a: {"rows": [{"layer": layer, "int8_pays": False}]})
    at_fork, real = [], mixed.build_one

    def build_one(*args, **kw):
        gc.collect()
        at_fork.append((session() is None, [bool(b) for _, b in built.held]))
        return real(*args, **kw)

    monkeypatch.setattr(mixed, "build_one", build_one)
    record = mixed._measure(ctx, built, built.recipes[DEFAULT])
    assert at_fork == [(True, [False] * len(built.held))] and record["float_layers"] == [layer]
    np.testing.assert_array_equal(ev.reference.run(x), before)  # the evidence's reference runs again, loaded anew
    assert box  # and keeps it for the next


def test_the_recipe_timing_loads_its_instances_with_no_session_held(staged, monkeypatch):
    """The recipe choice times every candidate and the reference on fresh loads, one set at a time: the deploy's
    held sessions are let go before (OpenVINO L: its FP32 and INT8 sessions beside an instance's set, 7.9 GiB)."""
    from convnext_deploy.pipeline.decisions import recipe

    ctx, src, _, _ = staged
    built = build(ctx, src)
    sessions = [weakref.ref(b[0]) for _, b in built.held]
    seen, real = [], recipe.measure

    def measure(runners, **kw):
        gc.collect()
        seen.append(([s() is None for s in sessions], list(runners.values())))
        return real(runners, **kw)

    monkeypatch.setattr(recipe, "measure", measure)
    rows = recipe._measure(ctx, built)
    assert seen == [([True] * len(sessions), [None] * (1 + len(built.recipes)))]
    assert [r["recipe"] for r in rows] == list(built.recipes) and all(r["p50_ms"] > 0 for r in rows)


def test_drop_modules_lets_the_smoothed_model_go(staged):
    """After the decisions, the smoothed torch module (its own tensors: half a variant's weights) is held by nothing."""
    ctx, *_ = staged
    src = export(ctx)  # a smoothed module of this test's own (the export is cached)
    built = build(ctx, src)
    smoothed = weakref.ref(src.int8.model)
    drop_modules(src, built)
    gc.collect()
    assert smoothed() is None and src.plain.model is None and ctx.ck.model is not None


def test_after_the_builds_an_onnx_target_keeps_the_smoothed_structure_not_its_weights(staged, tmp_path):
    """The decisions' rebuilds name float layers by the module's structure: with the checkpoint's module standing in
    for the smoothed one, a rebuild with float layers is the same graph, and the smoothed copy is held by nothing."""
    from convnext_deploy.pipeline.decisions.mixed import with_float
    from convnext_deploy.pipeline.models.convnext import weight_layers
    from convnext_deploy.pipeline.stages.build import structure_only
    from convnext_deploy.targets.base import BuildRequest

    ctx, *_ = staged
    src = export(ctx)
    built = build(ctx, src)
    smoothed = weakref.ref(src.int8.model)
    layers = [n for n, _ in weight_layers(ctx.ck.model)][3:5]
    options = with_float(ctx.options, layers)

    def rebuilt(model, name):
        (tmp_path / name).mkdir()
        art = ctx.target.build(BuildRequest("int8", src.int8.onnx_path, model, tmp_path / name, ctx.calibration,
                                            options=options))
        assert art.metadata["ops"]["float_conv_matmul_left"] >= len(layers)  # the named layers stayed in float
        return art.files[0].read_bytes()

    before = rebuilt(src.int8.model, "smoothed")
    structure_only(ctx, src, built)
    gc.collect()
    assert smoothed() is None and src.int8.model is ctx.ck.model and src.int8.onnx_path is not None
    assert rebuilt(src.int8.model, "structure") == before
    other = "channels_first" if src.int8.form != "channels_first" else "channels_last"
    with pytest.raises(RuntimeError, match="cannot be exported again"):  # its weights are not the smoothed ones
        formed(ctx, src.int8, other)


def test_other_candidates_are_evaluated_where_their_passes_are_cheap(staged, monkeypatch):
    ctx, *_ = staged
    judged = {"candidates": [{"recipe": "a", "control_n": 100}, {"recipe": "b", "not_judged": "cannot win"}]}
    work = len(ctx.split.evaluation) * validate_stage.model_macs(ctx.ck.model, ctx.ck.preprocessing.input_size)
    assert validate_stage._alternatives_on_evaluation(ctx, judged)  # atto at 32 px: 1,000 images are cheap
    monkeypatch.setattr(validate_stage, "ALTERNATIVES_MACS", work - 1)
    assert not validate_stage._alternatives_on_evaluation(ctx, judged)  # above it, the control figures stand in
    assert validate_stage._alternatives_on_evaluation(ctx, {"candidates": [{"recipe": "a"}]})  # not judged: evaluated


def test_validate_measures_every_precision_on_the_evaluation_split(validated):
    ctx, _, built, _, v = validated
    int8 = v.accuracy["int8"]
    assert int8["n"] == len(ctx.split.evaluation) == 1000
    assert int8["correct"] == round(int8["top1"] * int8["n"])
    assert 0 <= int8["agree"] <= int8["n"] and int8["drop_images"] == v.accuracy["fp32"]["correct"] - int8["correct"]
    keys = {(r["precision"], r["role"], r["batch"]) for r in v.latency}
    assert {("fp32", "deployment", 1), ("int8", "deployment", 1)} <= keys
    for row in v.latency:
        lo, hi = row["p50_ci_ms"]
        assert 0 < lo <= row["p50_ms"] <= hi


def test_gates_judge_the_figures_and_the_report_carries_them(validated, tmp_path):
    ctx, src, built, decision, v = validated
    measured, verdicts = gates.check(ctx, built, v, decision)
    assert {x.gate for x in verdicts} == {"max_top1_drop_pp", "min_agreement"}  # the accuracy-only gate file
    drop = next(x for x in verdicts if x.gate == "max_top1_drop_pp")
    assert drop.passed == (measured["top1_drop_pp"] <= 1.0) and drop.allowed == 1.0
    report = assemble(ctx, src, built, decision, v, None, (measured, verdicts))
    assert report["gates"]["passed"] == all(x.passed for x in verdicts)
    assert report["accuracy"] is v.accuracy and report["latency"] is v.latency
    assert report["machine"]["cpu"] and report["target"]["name"] == "onnxruntime"
    out = publish(replace(ctx, cfg=replace(ctx.cfg, out=tmp_path / "run")), report, built)
    assert {"report.json", "report.md", "report.html"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("args, env, named", [(["--timing-budget", "0"], {}, "--timing-budget '0' "),
                                               ([], {"CONVNEXT_DEPLOY_TIMING_BUDGET_S": "soon"}, "_S 'soon' ")])
def test_a_timing_budget_that_is_not_seconds_is_refused_in_one_line(cli_env, args, env, named):
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", *args], {**cli_env, **env}, code=2)
    assert named in p.stderr and "must be a number of seconds > 0" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, env, named", [(["--loads", "0"], {}, "--loads '0' "),
                                               ([], {"CONVNEXT_DEPLOY_LOADS": "two"}, "_LOADS 'two' ")])
def test_loads_that_are_not_a_count_are_refused_in_one_line(cli_env, args, env, named):
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", *args], {**cli_env, **env}, code=2)
    assert named in p.stderr and "must be a whole number ≥ 1" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("given, named", [("--batches 8", "--batches '8' "), ("--batches 1,x", "--batches '1,x' "),
                                          ("env 0,1", "_BATCHES '0,1' ")])
def test_batch_sizes_without_batch_1_or_not_counts_are_refused_in_one_line(cli_env, given, named):
    flag, value = given.split()
    env = {**cli_env, "CONVNEXT_DEPLOY_BATCHES": value} if flag == "env" else cli_env
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", *([flag, value] if flag != "env" else [])],
                env, code=2)
    assert named in p.stderr and "1 among them" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_batch_sizes_read_from_the_flag_or_the_environment(monkeypatch):
    from convnext_deploy.pipeline.core.settings import batches

    monkeypatch.delenv("CONVNEXT_DEPLOY_BATCHES", raising=False)
    assert batches(None) == (1, 8) and batches("8, 1,4") == (1, 4, 8)
    monkeypatch.setenv("CONVNEXT_DEPLOY_BATCHES", "1")
    assert batches(None) == (1,) and batches("1,16") == (1, 16)  # the flag over the variable


@pytest.mark.parametrize("target,path,user,expected", [
    ("onnxruntime", "avx2", {}, {"reduce_range": True}),
    ("openvino", "avx2", {}, {"overflow_fix": "enable"}),
    ("onnxruntime", "avx2", {"reduce_range": False}, {}),  # the user's option wins, and nothing is said
    ("onnxruntime", "vnni", {}, {}),
    ("onnxruntime", "arm-dotprod", {}, {}),
    ("tensorrt", "avx2", {}, {}),  # not an x86 CPU runtime
])
def test_the_default_int8_recipe_is_saturation_safe_on_a_path_without_vnni(target, path, user, expected):
    from convnext_deploy.pipeline.stages.prepare import path_defaults
    from convnext_deploy.targets import get_target

    notes = []
    assert path_defaults(get_target(target), path, user, notes, lambda m: None) == expected
    assert bool(notes) is bool(expected)
    if expected:
        assert "saturate" in notes[0] and next(iter(expected)) in notes[0]


def test_prepare_on_an_avx2_cpu_gives_the_default_recipe_7bit_weights(staged, monkeypatch):
    """What a Zen 3 (GitHub's ubuntu-latest) deploys by default, read from its recorded /proc/cpuinfo."""
    from conftest import REPO
    from convnext_deploy.pipeline.measure import machine
    from convnext_deploy.targets import get_target

    ctx, *_ = staged
    monkeypatch.setenv(machine.CPUINFO_ENV, str(REPO / "tests" / "data" / "cpuinfo" / "amd-epyc-zen3-avx2.txt"))
    avx2 = prepare(replace(ctx.cfg, n_eval=100), lambda m: None)
    assert avx2.options.reduce_range and avx2.int8_defaults == {"reduce_range": True}
    assert not get_target("onnxruntime").saturates_without_vnni(_artifact_of(avx2.options))
    monkeypatch.delenv(machine.CPUINFO_ENV)
    if not machine.cpu_profile()["u8s8_saturates"]:
        assert not ctx.options.reduce_range and ctx.int8_defaults == {}


def _artifact_of(options):
    from convnext_deploy.targets import get_target
    from convnext_deploy.targets.base import Artifact

    config = get_target("onnxruntime").build_config("int8", options)
    return Artifact("onnxruntime", "int8", [], {"quantization": config})
