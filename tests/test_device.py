"""Devices this machine is not (`--device`, pipeline/device/): each profile is the CPU it names, a deploy for an
emulated ARM device judges its accuracy gates on that core's own kernels (qemu-aarch64 with its -cpu, the
runtimes' aarch64 wheels) and reports those figures labelled, its speed gates read "not measured (emulated)" (exit
3 unless the gate file allows it), and `validate --device` checks a bundle there."""
import json
import re

import numpy as np
import pytest

from convnext_deploy.pipeline.core import gate_file
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.device import emulator, profiles
from convnext_deploy.pipeline.device.guest import run_guest
from convnext_deploy.pipeline.device.profiles import PROFILES, how_measured
from convnext_deploy.pipeline.measure import machine
from convnext_deploy.reports.cells import PASSING

from conftest import REPO, run_cli

CPUINFO = REPO / "tests" / "data" / "cpuinfo"
# each profile's CPU as its kernel describes it: recorded on the machines, save N2's (qemu-aarch64 10.0.2's model)
RECORDED = {"x86-avx2": "amd-epyc-zen3-avx2.txt", "x86-vnni": "amd-epyc-zen5-avx512-vnni.txt",
            "rpi4": "arm-cortex-a72-raspberry-pi-4.txt", "rpi5": "arm-cortex-a76-raspberry-pi-5.txt",
            "graviton2": "arm-neoverse-n1-graviton2.txt", "graviton3": "arm-neoverse-v1-graviton3.txt",
            "neoverse-n2": "arm-neoverse-n2-qemu-emulated.txt"}


def test_every_profile_is_the_cpu_it_names():
    assert set(RECORDED) == set(PROFILES)
    for name, file in RECORDED.items():
        core, flags = machine.cpuinfo_fields((CPUINFO / file).read_text())
        p = PROFILES[name]
        assert set(p.features) <= flags, name
        assert p.int8()["path"] == machine.cpu_profile(flags)["path"], name
        assert p.fp16_arithmetic == ("asimdhp" in flags), name
        if p.arch == profiles.ARM:
            assert p.core in core, (name, core)
    paths = {n: p.int8()["path"] for n, p in PROFILES.items()}
    assert paths == {"x86-avx2": "avx2", "x86-vnni": "vnni", "rpi4": "arm-neon", "rpi5": "arm-dotprod",
                     "graviton2": "arm-dotprod", "graviton3": "arm-i8mm", "neoverse-n2": "arm-i8mm"}


def test_native_or_emulated_follows_this_machines_int8_path(monkeypatch):
    monkeypatch.setattr(profiles, "_host_arch", lambda: profiles.X86)
    monkeypatch.setenv(machine.CPUINFO_ENV, str(CPUINFO / "amd-epyc-zen3-avx2.txt"))
    assert how_measured(PROFILES["x86-avx2"]) == "native"
    assert how_measured(PROFILES["rpi5"]) == "emulated"
    with pytest.raises(UserError, match="qemu cannot emulate"):  # TCG has no AVX-512: VNNI cannot be emulated
        how_measured(PROFILES["x86-vnni"])
    monkeypatch.setenv(machine.CPUINFO_ENV, str(CPUINFO / "amd-epyc-zen5-avx512-vnni.txt"))
    assert how_measured(PROFILES["x86-vnni"]) == "native"
    assert how_measured(PROFILES["x86-avx2"]) == "emulated"
    monkeypatch.setattr(profiles, "_host_arch", lambda: profiles.ARM)
    monkeypatch.setenv(machine.CPUINFO_ENV, str(CPUINFO / "arm-neoverse-v1-graviton3.txt"))
    assert how_measured(PROFILES["graviton3"]) == "native"
    assert how_measured(PROFILES["rpi4"]) == "emulated"


def test_a_speed_gate_of_an_emulated_device_is_not_measured_and_fails_unless_allowed():
    gates = {"max_top1_drop_pp": 0.3, "min_int8_speedup": 1.0}
    figures = {"top1_drop_pp": 0.0, "agreement": 1.0, "int8_speedup": 1.4, "p50_ms": 3.0,
               "counts": {"n": 100, "drop_images": 0, "agree": 100}}
    speed = {v.gate: v for v in gate_file.check(gates, figures, False, emulated=True)}["min_int8_speedup"]
    assert speed.status == gate_file.EMULATED and not speed.passed
    assert speed.measured is None  # this machine's 1.4× is not the device's
    allowed = {v.gate: v for v in gate_file.check({**gates, "allow_emulated": True}, figures, False, emulated=True)}
    assert allowed["min_int8_speedup"].status == gate_file.EMULATED_ALLOWED and allowed["min_int8_speedup"].passed
    assert allowed["max_top1_drop_pp"].status == "pass"
    host = {v.gate: v for v in gate_file.check(gates, figures, False)}["min_int8_speedup"]
    assert host.status == "pass" and host.measured == 1.4
    assert gate_file.EMULATED_ALLOWED in PASSING and gate_file.EMULATED not in PASSING


def test_allow_emulated_is_a_switch(tmp_path):
    f = tmp_path / "gates.toml"
    f.write_text("[defaults]\nallow_emulated = 1\n")
    with pytest.raises(UserError, match="allow_emulated = 1 in \\[defaults\\] must be true or false"):
        gate_file.load_gates(f, "onnxruntime", "atto")


def test_a_device_that_cannot_be_used_is_one_line(cli_env, tmp_path):
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--device", "pi9"], cli_env, code=2)
    assert p.stderr.strip().count("\n") == 0 and "unknown --device 'pi9'" in p.stderr and "rpi5" in p.stderr
    p = run_cli(["validate", str(tmp_path), "--device", "pi9"], cli_env, code=2)
    assert "unknown --device 'pi9'" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(["deploy", "--target", "tensorrt", "--variant", "atto", "--device", "graviton3"], cli_env, code=2)
    assert "tensorrt runs on NVIDIA GPU and cannot run there" in p.stderr
    env = {**cli_env, emulator.ENV_DIR: str(tmp_path / "nothing")}
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--device", "rpi5"], env, code=2)
    assert "make setup-emulation" in p.stderr and p.stderr.strip().count("\n") == 0


@pytest.fixture(scope="session")
def aarch64():
    try:
        return emulator.find("aarch64")
    except UserError as e:  # `make setup` builds it; a machine without it must say so, not pass
        pytest.fail(f"the aarch64 emulation is not set up here ({e})")


LOOSE_ACCURACY = "[defaults]\nmax_top1_drop_pp = 2.5\nmin_agreement = 0.95\n"
# --calib 300: the smoothed export of the session's ONNX Runtime deploy (`deployed`), shared through the cache
DEVICE_RUN = ["--target", "onnxruntime", "--variant", "atto", "--calib", "300", "--eval", "300", "--device-eval",
              "40", "--no-alternatives", "--runs", "5"]


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_deploy_for_rpi5_judges_accuracy_on_its_kernels_and_bundles_its_own_outputs(aarch64, atto_reference, cli_env,
                                                                                     tmp_path):
    out, gates = tmp_path / "rpi5", tmp_path / "gates.toml"
    # 1 image of 40 is 2.5 pp; unmeasured speed accepted (without it: exit 3, the next test)
    gates.write_text(LOOSE_ACCURACY + "min_int8_speedup = 1.0\nallow_emulated = true\n")
    run_cli(["deploy", *DEVICE_RUN, "--device", "rpi5", "--gates", str(gates), "--out", str(out)], cli_env, code=0)
    r = _report(out)
    d = r["device"]
    assert d["measured"] == "emulated" and d["label"] == "emulated ARM Cortex-A76" and d["n"] == 40
    assert d["cpu_seen"]["path"] == "arm-dotprod" and d["emulator"].startswith("qemu-aarch64 ")
    int8, fp32 = d["accuracy"]["int8"], d["accuracy"]["fp32"]
    assert 0 <= int8["correct"] <= 40 and int8["n"] == 40 and int8["drop_images"] == fp32["correct"] - int8["correct"]
    assert fp32["vs_host"]["top1_agree"] == 40 and fp32["vs_host"]["max_abs_diff_of_range"] < 1e-4  # FP32 is FP32
    assert int8["precision_executed"].startswith("int8 (") and "integer kernels" in int8["precision_executed"]
    verdicts = {v["gate"]: v for v in r["gates"]["verdicts"]}
    assert verdicts["max_top1_drop_pp"]["counts"]["n"] == 40  # the device's figures decide, not the host's 300
    assert verdicts["min_agreement"]["counts"]["images"] == int8["agree"]
    assert verdicts["min_int8_speedup"]["status"] == gate_file.EMULATED_ALLOWED
    assert r["gates"]["int8_path"] == "arm-dotprod"
    assert [s["stage"] for s in r["memory"]["stages"]][-2:] == ["validate", "device"]  # a stage, measured as one
    md = (out / "report.md").read_text()
    assert "## On the device" in md and "emulated ARM Cortex-A76" in md and f"{int8['correct']}/40" in md
    # the bundle's reference outputs are the A76's own, which validate on the A76 gives again exactly
    _validates_on_its_device(out, "rpi5", "emulated ARM Cortex-A76", "arm-dotprod", cli_env)


def test_unmeasured_speed_of_an_emulated_device_exits_3_unless_allowed():
    """Every measured gate passed and only the speed gates are "not measured (emulated)": exit 3 with the reason
    (allow_emulated makes them pass, and the deploy exits 0: the test above); any other failure is exit 1's."""
    from types import SimpleNamespace

    from convnext_deploy.pipeline.deploy import _speed_unmeasured

    def verdict(passed, status):
        return SimpleNamespace(passed=passed, status=status)

    ctx = SimpleNamespace(notes=["earlier"], device=PROFILES["rpi5"])
    unmeasured = [verdict(True, "pass"), verdict(False, gate_file.EMULATED)]
    said = _speed_unmeasured(ctx, unmeasured)
    assert said == ctx.notes[0] and "allow_emulated = true" in said and "emulated rpi5" in said
    assert _speed_unmeasured(ctx, [verdict(False, "fail"), verdict(False, gate_file.EMULATED)]) is None
    assert _speed_unmeasured(ctx, [verdict(True, "pass"), verdict(True, gate_file.EMULATED_ALLOWED)]) is None


def _validates_on_its_device(out, device: str, label: str, path: str, cli_env, bundled_on: str | None = None) -> dict:
    """The bundle's reference outputs are the device's (kernels, INT8 path and runtime named; the host's kept as a
    second set), and `validate --device` there compares with them: within 0.5 % of the range, every top-1 the same."""
    ref = np.load(out / "bundle" / "reference_outputs.npz")
    index = json.loads((out / "bundle" / "preprocessing.json").read_text())
    made = index["reference_sets"]["outputs"]["int8"]
    assert made["device"].startswith(f"{label} (qemu-aarch64 ") and made["int8_path"] == path
    assert made["runtime"].startswith("onnxruntime ") and index["reference_made_by"]["int8"] == made
    host = index["reference_sets"]["host_outputs"]["int8"]
    assert host["int8_path"] == (bundled_on or machine.cpu_profile()["path"]) and host["vs_device"]["n"] == len(
        ref["labels"])
    card = (out / "bundle" / "MODEL_CARD.md").read_text()
    assert f"int8: {made['runtime']} on {made['device']}" in card and "an emulated device's set" in card
    device_run = np.load(out / "device_reference_outputs.npz")
    assert np.array_equal(ref["outputs_int8"], device_run["outputs_int8"])  # made on the device, not here
    assert np.array_equal(ref["indices"], device_run["indices"])
    p = run_cli(["validate", str(out / "bundle"), "--device", device], cli_env, code=0)
    assert f"reference set: the bundle's own, made on {label}" in p.stdout and "the path this CPU takes" in p.stdout
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("reference outputs int8"))
    n = len(ref["labels"])
    diff = float(re.search(r"max \|Δlogits\| ([0-9.e+-]+)", line).group(1))
    span = float(ref["outputs_int8"].max() - ref["outputs_int8"].min())
    assert f"top-1 {n}/{n} agree: pass" in line and diff <= 0.005 * span, line
    return ref


@pytest.fixture(scope="module")
def graviton3_run(aarch64, atto_reference, cli_env, tmp_path_factory):
    """A deploy for the emulated Graviton3 whose gate file accepts unmeasured speed: it bundles."""
    d = tmp_path_factory.mktemp("graviton3")
    (d / "gates.toml").write_text(LOOSE_ACCURACY + "min_int8_speedup = 1.0\nallow_emulated = true\n")
    out = d / "graviton3"
    run_cli(["deploy", *DEVICE_RUN, "--device", "graviton3", "--gates", str(d / "gates.toml"), "--out", str(out)],
            cli_env, code=0)
    return out


def test_deploy_for_graviton3_allowed_unmeasured_speed_ships_a_bundle_that_validates_there(graviton3_run, cli_env):
    out = graviton3_run
    r = _report(out)
    assert r["device"]["label"] == "emulated ARM Neoverse-V1" and r["device"]["cpu_seen"]["path"] == "arm-i8mm"
    speed = next(v for v in r["gates"]["verdicts"] if v["gate"] == "min_int8_speedup")
    assert speed["status"] == gate_file.EMULATED_ALLOWED and speed["measured"] is None
    assert "min_int8_speedup not measured on the emulated device (allowed" in (out / "report.md").read_text()
    index = json.loads((out / "bundle" / "preprocessing.json").read_text())
    assert index["device"] == {"name": "graviton3", "description": "AWS Graviton3 (Arm Neoverse-V1)",
                               "measured": "emulated", "label": "emulated ARM Neoverse-V1"}
    ref = _validates_on_its_device(out, "graviton3", "emulated ARM Neoverse-V1", "arm-i8mm", cli_env)
    # here, another INT8 path: validate compares with the host's set, made on this path
    p = run_cli(["validate", str(out / "bundle"), "--runs", "0"], cli_env, code=0)
    assert "reference set: the deploy host's" in p.stdout and "validate: PASS" in p.stdout
    # device-check runs only on the device: here it is refused; in the (emulated) device the same images give the
    # same predictions, image by image (the deploy matrix runs it on a real Neoverse-N2)
    p = run_cli(["device-check", str(out)], cli_env, code=2)
    assert "is not graviton3" in p.stderr and p.stderr.strip().count("\n") == 0
    done = run_guest(PROFILES["graviton3"], ["--cli", "device-check", str(out)], timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert done.stdout.count("the same prediction on 40/40: match") == 2 and "device-check: PASS" in done.stdout


@pytest.mark.parametrize("here,which,says", [
    ("arm-cortex-a76-raspberry-pi-5.txt", "outputs", "the bundle's own, made on emulated ARM Cortex-A76"),
    ("amd-epyc-zen3-avx2.txt", "host_outputs", "the deploy host's, made on AMD EPYC, 2 threads, INT8 path avx2"),
    ("arm-neoverse-v1-graviton3.txt", "outputs", "this CPU takes INT8 path arm-i8mm"),
])
def test_validate_compares_with_the_set_made_on_its_own_int8_path(monkeypatch, here, which, says):
    """A bundle for an rpi5 made on an AVX2 host: on the A76 its own set, on the AVX2 host's path the host's, on a
    third path its own with the difference to expect (the one measured between the two sets)."""
    from convnext_deploy.pipeline.ship.verify import reference_choice

    monkeypatch.setenv(machine.CPUINFO_ENV, str(CPUINFO / here))
    sets = {"outputs": {"int8": {"device": "emulated ARM Cortex-A76 (qemu-aarch64 10.0.2 -cpu cortex-a76)",
                                 "int8_path": "arm-dotprod"}},
            "host_outputs": {"int8": {"device": "AMD EPYC, 2 threads", "int8_path": "avx2",
                                      "vs_device": {"max_abs_diff_of_range": 0.066, "top1_agree": 197, "n": 200}}}}
    got, line = reference_choice({"reference_sets": sets}, {})
    assert got == which and says in line, line
    if "arm-i8mm" in says:
        assert "expect INT8 outputs to differ" in line and "6.6 % of the range, top-1 197/200" in line


def test_a_device_bundle_made_on_an_avx2_host_carries_the_devices_outputs(avx2_emulator, graviton3_run, cli_env,
                                                                            tmp_path):
    """`bundle` run on x86 without VNNI (qemu-x86_64 -cpu Haswell-v4, bit for bit a Zen 3): its own outputs of the
    full 8-bit INT8 model saturate, yet the bundle's reference set is the device's, so it validates there."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(graviton3_run, run, ignore=shutil.ignore_patterns("bundle"))
    done = run_guest(PROFILES["x86-avx2"], ["-m", "convnext_deploy", "bundle", str(run)], timeout=600,
                     env={"PYTHONPATH": str(REPO)}, script=None)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    here, avx2 = (np.load(d / "bundle" / "reference_outputs.npz") for d in (graviton3_run, run))
    assert np.array_equal(here["outputs_int8"], avx2["outputs_int8"])  # the device's set, whoever bundles
    host = json.loads((run / "bundle" / "preprocessing.json").read_text())["reference_sets"]["host_outputs"]["int8"]
    assert host["int8_path"] == "avx2" and not np.array_equal(avx2["host_outputs_int8"], avx2["outputs_int8"])
    _validates_on_its_device(run, "graviton3", "emulated ARM Neoverse-V1", "arm-i8mm", cli_env, bundled_on="avx2")


def _deploy_everywhere(target: str, device: str, cli_env, tmp_path, code: int, extra=()):
    gates = tmp_path / "gates.toml"
    gates.write_text(LOOSE_ACCURACY + "min_int8_speedup = 1.0\nallow_emulated = true\n")
    out = tmp_path / device
    args = [a if a != "onnxruntime" else target for a in DEVICE_RUN if a != "--no-alternatives" or not extra]
    p = run_cli(["deploy", *args, *extra, "--device", device, "--gates", str(gates), "--out", str(out)], cli_env,
                code=code)
    return _report(out), p


@pytest.mark.slow
@pytest.mark.parametrize("device", list(PROFILES))
def test_every_profile_deploys_onnxruntime_int8_on_its_own_numerics(device, atto_reference, cli_env, tmp_path):
    profile = PROFILES[device]
    try:
        mode = how_measured(profile)
    except UserError:  # x86-vnni from a CPU without it: qemu cannot emulate AVX-512
        p = run_cli(["deploy", *DEVICE_RUN, "--device", device], cli_env, code=2)
        assert "qemu cannot emulate" in p.stderr
        return
    if mode == "emulated":
        emulator.find(profile.arch)  # set up by `make setup` (the x86 one is Debian's qemu-user-static)
    r, _ = _deploy_everywhere("onnxruntime", device, cli_env, tmp_path, code=0)
    d = r["device"]
    assert d["name"] == device and d["measured"] == mode and r["gates"]["int8_path"] == profile.int8()["path"]
    if mode == "native":
        assert "accuracy" not in d and r["gates"]["passed"]
        return
    assert d["cpu_seen"]["path"] == profile.int8()["path"]  # the guest's own kernel says which core it is
    int8 = d["accuracy"]["int8"]
    assert int8["n"] == 40 and "integer kernels" in int8["precision_executed"]
    if profile.int8()["path"] == "avx2":  # its default has 7-bit weights: no pair saturates, so exactly this machine's
        assert int8["vs_host"]["max_abs_diff"] == 0 and int8["vs_host"]["top1_agree"] == 40
    else:  # ARM's dot-product/I8MM/NEON kernels accumulate exactly, as VNNI does
        assert int8["vs_host"]["max_abs_diff_of_range"] < 0.03 and int8["vs_host"]["top1_agree"] >= 39


@pytest.mark.slow
def test_x86_avx2_excludes_the_saturating_recipes(atto_reference, cli_env, tmp_path):
    if how_measured(PROFILES["x86-avx2"]) == "native":
        pytest.skip("this CPU is itself AVX2 without VNNI: its deploy measures that path directly")
    r, _ = _deploy_everywhere("onnxruntime", "x86-avx2", cli_env, tmp_path, code=0, extra=("--recipe", "auto"))
    rows = {c["recipe"]: c for c in r["recipe_choice"]["candidates"]}
    chosen = next(c for c in rows.values() if c["chosen"])
    assert chosen["excluded"] is None and "emulated device" in r["recipe_choice"]["case"]
    # the default is saturation-safe on that path (7-bit weights); full 8-bit candidates are excluded
    assert rows["ours (default)"]["excluded"] is None and any("reduce_range=True" in n for n in r["notes"])
    assert "saturate" in rows["ours with int8 MatMul outputs (QLinearMatMul)"]["excluded"]
    assert rows["ours with reduce_range (U8S8, 7-bit weights)"]["excluded"] is None


@pytest.mark.slow
@pytest.mark.parametrize("device, hint", [("graviton3", "f16"), ("rpi4", "f32")])
def test_openvino_int8_on_arm_runs_in_float_and_the_deploy_says_so(device, hint, aarch64, atto_reference, cli_env,
                                                                   tmp_path):
    from convnext_deploy.pipeline.ship.bundle import device_settings
    from convnext_deploy.pipeline.ship.bundle_index import preprocessing_json

    r, p = _deploy_everywhere("openvino", device, cli_env, tmp_path, code=1)
    int8 = r["device"]["accuracy"]["int8"]
    convs = {k: n for k, n in int8["layers"]["compute"].items() if k.startswith("Convolution")}
    assert convs == {f"Convolution {hint}": 40}  # ACL has no INT8 kernel for them: float "simulation"
    assert int8["settings"]["INFERENCE_PRECISION_HINT"] == hint  # A72 has no FP16 arithmetic: f32
    verdict = next(v for v in r["gates"]["verdicts"] if v["gate"] == "int8_executes")
    assert verdict["status"] == "fail" and "runs this INT8 artifact in float" in verdict["reason"]
    assert "int8_executes fail" in p.stderr and not (tmp_path / device / "bundle").exists()
    # what a bundle for the device is told: the precision the device resolved, not this machine's
    rows = {a["precision"]: a for a in r["artifacts"] if a["precision"] in ("int8", "fp32")}
    index = preprocessing_json(r, rows, 10, {q: device_settings(r, q) for q in rows})
    assert index["models"]["int8"]["config"]["INFERENCE_PRECISION_HINT"] == hint
    assert index["models"]["fp32"]["config"]["INFERENCE_PRECISION_HINT"] == \
        r["device"]["accuracy"]["fp32"]["settings"]["INFERENCE_PRECISION_HINT"]
