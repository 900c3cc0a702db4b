import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from convnext_deploy.calibration.batches import load_array
from convnext_deploy.calibration.fashion_mnist import FashionMNIST, default_root
from convnext_deploy.calibration.split import make_split
from convnext_deploy.pipeline.models.checkpoints import load_checkpoint
from convnext_deploy.pipeline.stages.context import DEFAULT

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    root = default_root()
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST is not installed at {root}: run `make setup` (apt-get install dataset-fashion-mnist)")
    return root


@pytest.fixture(scope="session")
def atto_reference(fmnist_root) -> Path:
    """The atto reference checkpoint: made by `make test` before pytest; trained here if missing."""
    from convnext_deploy.pipeline.models.reference import reference_path
    from convnext_deploy.pipeline.models.train import recipe_for, train_reference

    os.chdir(REPO)
    path = reference_path("atto")
    if not (path.exists() and path.with_suffix(".json").exists()):
        train_reference(recipe_for("atto"), path)
    return path


def session_export(checkpoint: Path, cli_env: dict, form: str = "channels_last") -> Path:
    """The atto reference exported in graph `form` into the session's build cache, where every CLI deploy of the
    session finds it as its own export (and a deploy's export is found here): made once a session."""
    from convnext_deploy.pipeline.models.onnx_export import export_cached

    ck = load_checkpoint(checkpoint, "atto")
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVNEXT_DEPLOY_CACHE_DIR", cli_env["CONVNEXT_DEPLOY_CACHE_DIR"])
        return export_cached(ck.model, ck.sha256, "atto", x, log=lambda m: None, form=form).path


@pytest.fixture(scope="session")
def atto_onnx(atto_reference, cli_env) -> Path:
    """The atto reference exported once for the session (the export is itself tested in test_export.py); a test that
    writes beside it copies it (`copy_onnx`)."""
    return session_export(atto_reference, cli_env)


def copy_onnx(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copyfile(src, dst)
    return dst


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter distinct random values, so a mis-mapped key changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@dataclass
class ReferenceSplit:
    """The atto reference checkpoint with a Fashion-MNIST split and its calibration images loaded."""

    ck: object
    train: object
    test: object
    split: object
    calib_x: np.ndarray

    def load(self, which: str):
        """(images, labels) of the split's "evaluation" or "control" part."""
        source = self.test if which == "evaluation" else self.train
        return load_array(source, getattr(self.split, which).indices, self.ck.preprocessing)


def reference_split(checkpoint: Path, n_calib: int, n_eval: int | None, n_control: int = 0) -> ReferenceSplit:
    ck = load_checkpoint(checkpoint, "atto")
    train, test = FashionMNIST("train"), FashionMNIST("test")
    split = make_split(train, test, n_calib=n_calib, n_eval=n_eval, seed=0, n_control=n_control)
    calib_x, _ = load_array(train, split.calibration.indices, ck.preprocessing)
    return ReferenceSplit(ck, train, test, split, calib_x)


TEST_TIMING_BUDGET_S = "2"
TEST_LOADS = "1"
TEST_BATCHES = "1"  # latency at batch 1 only (the gates' figure); the shared `deployed` times batch 8 too
# a deploy that tests something other than the recipe search builds and deploys the default recipe only: no candidates
# timed against each other, no latency-aware step (the shared `deployed` runs both)
PINNED_RECIPE = ("--no-alternatives", "--recipe", DEFAULT)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict:
    """One build cache for every CLI test of the session: the atto export and its builds are made once and
    reused (a re-run with the same inputs is itself a behaviour under test: 'cached')."""
    cache = tmp_path_factory.mktemp("cache")
    # a decision's extra timing rounds capped at 2 s, each artifact timed on one load (not 3) and at batch 1 only:
    # tests check what is decided and reported, not how finely it is timed
    return {**os.environ, "CONVNEXT_DEPLOY_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO),
            "CONVNEXT_DEPLOY_TIMING_BUDGET_S": TEST_TIMING_BUDGET_S, "CONVNEXT_DEPLOY_LOADS": TEST_LOADS,
            "CONVNEXT_DEPLOY_BATCHES": TEST_BATCHES}


def run_cli(args, env: dict, code: int | None = None, timeout: int = 900):
    """`convnext-deploy ARGS` in the repo, a process of its own (forked_cli); asserts the exit code when given."""
    import forked_cli

    p = forked_cli.run(args, env, REPO, timeout)
    if code is not None:
        assert p.returncode == code, p.stdout + p.stderr
    return p


GATES_ACCURACY_ONLY = """
[defaults]
max_top1_drop_pp = 1.0
min_agreement = 0.97
"""


@pytest.fixture(scope="session")
def deployed(atto_reference, cli_env, tmp_path_factory):
    """One ONNX Runtime deploy of the atto reference, shared by every test that reads its report."""
    d = tmp_path_factory.mktemp("deploy")
    gates = d / "gates.toml"
    gates.write_text(GATES_ACCURACY_ONLY)
    out = d / "report"
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--eval", "1000", "--calib", "300",
                 "--runs", "10", "--loads", "2", "--batches", "1,8", "--gates", str(gates), "--out", str(out)],
                cli_env, code=0)
    return out, p, gates


@pytest.fixture(scope="session")
def coreml_deployed(atto_reference, cli_env, tmp_path_factory):
    """One Core ML deploy of the atto reference (loose gates that accept proxy figures), shared by the target's tests
    and the bundle's: off macOS it converts and quantizes, measures on the proxy and exits 3."""
    pytest.importorskip("coremltools", reason="coremltools is not installed: pip install 'convnext-deploy[coreml]'")
    from convnext_deploy.targets import get_target

    d = tmp_path_factory.mktemp("coreml")
    (d / "gates.toml").write_text("[defaults]\nmax_top1_drop_pp = 5\nallow_proxy = true\n")
    p = run_cli(["deploy", "--target", "coreml", "--variant", "atto", "--calib", "200", "--eval", "500",
                 *PINNED_RECIPE, "--runs", "3", "--gates", str(d / "gates.toml"), "--out", str(d / "run")],
                cli_env, code=0 if get_target("coreml").available().ok else 3)
    return d / "run", p


@pytest.fixture(scope="session")
def tensorrt_deployed(atto_reference, cli_env, tmp_path_factory) -> dict:
    """TensorRT deploys of the atto reference where no engine can be built (the Q/DQ ONNX proxy's accuracy, no
    latency, exit 3), once under gates that refuse proxy figures and once under gates that allow them: name → (report
    folder, process). Shared by the target's tests and `summarize`'s."""
    d = tmp_path_factory.mktemp("tensorrt")
    runs = {}
    for allow, name in ((False, "strict"), (True, "allow")):
        gates = d / f"{name}.toml"
        gates.write_text("[defaults]\nmax_top1_drop_pp = 0.3\nmin_int8_speedup = 1.0\n"
                         f"allow_proxy = {str(allow).lower()}\n")
        out = d / name / "tensorrt-atto"
        # --calib 300: the smoothed export of the session's ONNX Runtime deploy (`deployed`), shared through the cache
        runs[name] = out, run_cli(["deploy", "--target", "tensorrt", "--variant", "atto", "--eval", "500",
                                   "--calib", "300", *PINNED_RECIPE, "--gates", str(gates), "--out", str(out)],
                                  cli_env)
    return runs


@pytest.fixture
def avx2_emulator():
    """Skips (before any other fixture of the test is made) where emulation is not what checks the AVX2 path: this
    CPU is itself AVX2 without VNNI (the suite's own run is that path), or not x86."""
    import platform

    from convnext_deploy.pipeline.core.errors import UserError
    from convnext_deploy.pipeline.device import emulator
    from convnext_deploy.pipeline.measure import machine

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX2 emulator runs x86-64 programs: this machine is not x86")
    if machine.cpu_profile()["u8s8_saturates"]:
        pytest.skip("this CPU is itself AVX2 without VNNI: the suite's own run checks that path natively")
    try:
        emulator.find("x86_64")
    except UserError as e:
        pytest.fail(f"cannot emulate AVX2 without VNNI: {e}")
