"""The rooms of ARCHITECTURE.md, checked on the import statements of every module."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

TOOLCHAINS = {"onnxruntime", "onnx", "openvino", "nncf", "tensorrt", "coremltools", "pycuda", "cuda", "modelopt"}
STDLIB_OK = {"__future__", "dataclasses", "hashlib", "json", "os", "pickle", "re", "tempfile", "pathlib", "typing",
             "math", "copy"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top(names):
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("room", ["calibration", "reports"])
def test_calibration_and_reports_import_no_toolchain_and_no_target(room):
    for f in (REPO / room).glob("*.py"):
        bad = top(imports(f)) & (TOOLCHAINS | {"targets"})
        assert not bad, f"{f.name} imports {bad}"


def test_targets_import_no_other_target_and_not_the_cli():
    for f in (REPO / "targets").glob("*.py"):
        names = imports(f)
        # targets.qdq: shared Q/DQ ONNX tools (sensitivity), not a target
        others = {n for n in names if n.startswith("targets.") and n not in ("targets.base", "targets.qdq")}
        assert not others, f"{f.name} imports {others}"
        assert "pipeline.cli" not in names


def test_target_modules_do_not_shadow_toolchains():
    assert not {f.stem for f in (REPO / "targets").glob("*.py")} & TOOLCHAINS


def test_toolchains_are_imported_lazily_in_targets():
    """No toolchain import at module level, so the CLI runs with none installed."""
    for f in (REPO / "targets").glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = {a.name for a in node.names} if isinstance(node, ast.Import) else {node.module or ""}
                assert not top(mods) & TOOLCHAINS, f"{f.name} imports a toolchain at module level"


@pytest.mark.parametrize("name", ["model.py", "checkpoints.py", "variants.py"])
def test_model_and_checkpoint_code_import_only_torch_and_safetensors(name):
    allowed = {"torch", "safetensors", "pipeline"} | STDLIB_OK
    assert top(imports(REPO / "pipeline" / name)) <= allowed
