"""INT8 on x86 without VNNI (AVX2 only: GitHub's ubuntu-latest, AMD EPYC Zen 3), checked from any x86 CPU.

Where this CPU has VNNI, the INT8 numerics tests run again under `qemu-x86_64 -cpu Haswell-v4`, whose ONNX
Runtime kernels saturate u8×s8 pair sums as a real Zen 3 does, bit for bit (the x86-avx2 device profile,
pipeline/device/guest.py). So does `validate --device x86-avx2` of a bundle measured here. Where this CPU is itself AVX2 without VNNI, the suite's own run is that
path: the emulated tests skip and say so. The numerics are the emulated CPU's; its speed means nothing."""
import json
import platform

import pytest

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.device import emulator
from convnext_deploy.pipeline.device.guest import run_guest
from convnext_deploy.pipeline.device.profiles import PROFILES
from convnext_deploy.pipeline.measure import machine
from convnext_deploy.pipeline.ship.int8_path import check_int8_path
from convnext_deploy.pipeline.stages.context import DEFAULT
from convnext_deploy.targets import get_target

from conftest import REPO, run_cli

CPUINFO = REPO / "tests" / "data" / "cpuinfo"
EMULATED_TIMEOUT_S = 420  # one run here took 10-25 s on a Zen 5 (imports, 16 images of atto under TCG)


INT8_NUMERICS_TESTS = ["tests/test_peak.py::test_onnxruntime_u8s8_gemm_follows_this_cpus_int8_path",
                       "tests/test_peak.py::test_the_gemm_graphs_compute_a_matrix_product_through_the_runtime"]


def test_the_int8_numerics_tests_pass_on_the_avx2_path(avx2_emulator):
    """The INT8 GEMM tests, whose expected value is the CPU's path's, run under the emulator: there the saturating
    rule must hold, the exact product must not, and the matrix product of non-saturating inputs is still exact."""
    p = run_guest(PROFILES["x86-avx2"], ["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *INT8_NUMERICS_TESTS],
                  EMULATED_TIMEOUT_S, env={"PYTHONPATH": str(REPO / "tests")}, script=None)
    print(p.stdout[-3000:])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "AVX2 without VNNI (VPMADDUBSW" in p.stdout  # the profile the expected values were taken from
    assert "3 passed" in p.stdout


def _report(built_on: str, saturates: bool) -> dict:
    name, flags = machine.cpuinfo_fields((CPUINFO / f"{built_on}.txt").read_text())
    prof = machine.cpu_profile(flags, name)
    return {"machine": {"cpu_profile": prof},
            "int8_numerics": {"measured_on": prof["cpu"], "int8_path": prof["int8_path"],
                              "saturates_without_vnni": saturates}}


@pytest.mark.parametrize("here,built_on,saturates,passes,says", [
    ("amd-epyc-zen3-avx2", "amd-epyc-zen5-avx512-vnni", True, False, "saturate here"),
    ("amd-epyc-zen3-avx2", "amd-epyc-zen5-avx512-vnni", False, True, "no u8×s8 pair can saturate"),
    ("amd-epyc-zen3-avx2", "amd-epyc-zen3-avx2", True, True, "its figures include the saturation"),
    ("amd-epyc-zen5-avx512-vnni", "amd-epyc-zen3-avx2", True, True, "accumulates u8×s8 exactly"),
    ("arm-neoverse-v1-graviton3", "amd-epyc-zen5-avx512-vnni", True, True, "accumulates u8×s8 exactly"),
])
def test_validate_reads_the_int8_path_of_the_cpu_it_runs_on(monkeypatch, here, built_on, saturates, passes, says):
    monkeypatch.setenv(machine.CPUINFO_ENV, str(CPUINFO / f"{here}.txt"))
    ok, line = check_int8_path(_report(built_on, saturates), get_target("onnxruntime").int8_recipes)
    assert ok is passes and says in line, line
    if not passes:
        assert "ours with reduce_range (U8S8, 7-bit weights)" in line and "Deploy on this CPU" in line
    assert check_int8_path({"int8_numerics": {"int8_path": "x"}}) is None  # a bundle from before the check


SEVEN_BIT = "ours with reduce_range (U8S8, 7-bit weights)"


@pytest.fixture(scope="module")
def bundles(atto_reference, cli_env, tmp_path_factory):
    """Bundles of ONNX Runtime recipes measured on this CPU, made on first use: recipe → report folder."""
    made = {}

    def bundle(recipe: str):
        if recipe not in made:
            d = tmp_path_factory.mktemp("bundle")
            (d / "gates.toml").write_text("[defaults]\nmax_top1_drop_pp = 5\n")
            # --calib 300: the smoothed export of the session's deploys, shared through the cache
            run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--calib", "300", "--eval", "200",
                     "--control", "0", "--no-alternatives", "--recipe", recipe, "--runs", "3", "--gates",
                     str(d / "gates.toml"), "--out", str(d / "run")], cli_env, code=0)
            made[recipe] = d / "run"
        return made[recipe]

    return bundle


def _int8_line(stdout: str) -> str:
    return next(ln for ln in stdout.splitlines() if ln.startswith("reference outputs int8"))


@pytest.mark.parametrize("recipe", [DEFAULT, SEVEN_BIT])
def test_validate_on_avx2_fails_a_full_8bit_bundle_measured_with_vnni_and_passes_7bit(avx2_emulator, bundles, recipe,
                                                                                       cli_env):
    """The default recipe's INT8 weights use all 8 bits: validate under the emulated AVX2 CPU runs the model (its
    outputs move: the path really differs) and fails with the saturation named, exit 1, where the same bundle
    passes here. With 7-bit weights (reduce_range) no pair saturates: the same bundle passes on both paths."""
    run = bundles(recipe)
    report = json.loads((run / "report.json").read_text())
    assert report["int8_numerics"]["saturates_without_vnni"] is (recipe == DEFAULT)
    assert report["machine"]["cpu_profile"]["vnni"]
    here = run_cli(["validate", str(run / "bundle"), "--runs", "0"], cli_env, code=0)
    assert "validate: PASS" in here.stdout
    p = run_cli(["validate", str(run / "bundle"), "--device", "x86-avx2"], cli_env, timeout=EMULATED_TIMEOUT_S)
    print(f"\n{recipe}, here: {_int8_line(here.stdout)}\n{recipe}, emulated AVX2: {_int8_line(p.stdout)}")
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if recipe == DEFAULT:
        assert "accumulates u8×s8 exactly" in here.stdout
        assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
        assert "INT8 path: FAIL: this CPU has no VNNI (AVX2 without VNNI" in p.stdout and "saturate here" in p.stdout
        assert "validate: FAIL" in p.stdout
        assert _int8_line(p.stdout) != _int8_line(here.stdout)  # the saturating kernels computed other outputs
    else:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        assert "no u8×s8 pair can saturate on any CPU" in p.stdout and "validate: PASS" in p.stdout


def test_the_cpuinfo_override_names_a_file_that_exists(monkeypatch, tmp_path):
    """The emulated runs are told their CPU through machine.CPUINFO_ENV; a path that is not there describes no CPU,
    and says so in one line instead of describing the host or none."""
    monkeypatch.setenv(machine.CPUINFO_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match=f"{machine.CPUINFO_ENV}=.*missing.txt: cannot read") as e:
        machine.cpu_profile()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("target,recipe,saturates", [
    ("onnxruntime", "ours (default)", True),
    ("onnxruntime", "ours with int8 activations (S8S8)", True),  # x86 ORT turns S8 activations into U8
    ("onnxruntime", "ours with reduce_range (U8S8, 7-bit weights)", False),
    ("onnxruntime", "ours with uint8 weights (U8U8)", False),
    ("onnxruntime", "quantize_static defaults", True),
    ("openvino", "ours (default)", True),  # NNCF's default overflow fix: 7-bit weights in the first layer only
    ("openvino", "ours with overflow_fix=enable (7-bit weights)", False),
])
@pytest.mark.parametrize("cpuinfo", ["amd-epyc-zen3-avx2", "amd-epyc-zen5-avx512-vnni"])
def test_the_report_says_which_int8_artifacts_saturate_without_vnni(monkeypatch, target, recipe, saturates, cpuinfo):
    """What `validate` reads: from the artifact's recorded build (the recipe's options as the target records them),
    and a warning that names the CPU the figures were measured on."""
    from types import SimpleNamespace

    from convnext_deploy.pipeline.decisions.recipe import numerics
    from convnext_deploy.targets.base import Artifact

    spec = get_target(target)
    named = {r.name: r.options for r in spec.int8_recipes}
    if recipe != DEFAULT and recipe not in named:
        pytest.fail(f"{target} has no recipe {recipe!r} (it has {sorted(named)})")
    options = spec.make_options(**named.get(recipe, {}))
    config = spec.build_config("int8", options)
    art = Artifact(target, "int8", [], {"quantization": config} if target == "onnxruntime" else {"build": config})
    monkeypatch.setenv(machine.CPUINFO_ENV, str(CPUINFO / f"{cpuinfo}.txt"))
    ctx = SimpleNamespace(target=spec, notes=[])
    out = numerics(ctx, art)
    path = {"amd-epyc-zen3-avx2": "avx2", "amd-epyc-zen5-avx512-vnni": "vnni"}[cpuinfo]
    assert out["saturates_without_vnni"] is saturates and out["path"] == path
    if saturates:
        assert "saturate" in out["warning"] and ctx.notes == [out["warning"]]
        assert ("the figures above include it" in out["warning"]) is (path == "avx2")
        assert ("`validate` on such a CPU fails" in out["warning"]) is (path != "avx2")
    else:
        assert "warning" not in out and ctx.notes == []
