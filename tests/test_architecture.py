"""The rules of ARCHITECTURE.md, checked on every module's imports and signatures."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

TOOLCHAINS = {"onnxruntime", "onnx", "openvino", "nncf", "tensorrt", "coremltools", "pycuda", "cuda", "modelopt"}
STDLIB_OK = {"__future__", "dataclasses", "hashlib", "json", "os", "pickle", "re", "tempfile", "pathlib", "typing",
             "math", "copy"}
SHARED_TARGET_TOOLS = {"targets", "targets.base", "targets.qdq", "targets.ort_tools", "targets.coreml_proxy"}
PIPELINE_LEAVES = {"pipeline.errors", "pipeline.model", "pipeline.machine", "pipeline.cache", "pipeline.export",
                   "pipeline.variants"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module in ("targets", "pipeline")}
    return names


def top(names):
    return {n.split(".")[0] for n in names}


def py_files(*rooms):
    return [f for room in rooms for f in (REPO / room).rglob("*.py")]


def test_the_document_is_in_the_project_and_names_the_stages():
    doc = (REPO / "ARCHITECTURE.md").read_text()
    for stage in ("prepare", "export", "build", "decide", "validate", "gates", "report"):
        assert f"stages/{stage}.py" in doc and (REPO / "pipeline" / "stages" / f"{stage}.py").exists()


@pytest.mark.parametrize("room", ["calibration", "reports"])
def test_calibration_and_reports_import_no_toolchain_and_no_target(room):
    for f in py_files(room):
        bad = top(imports(f)) & (TOOLCHAINS | {"targets"})
        assert not bad, f"{f.name} imports {bad}"


def test_targets_import_no_other_target_and_only_pipeline_leaves():
    modules = {f"targets.{f.stem}" for f in (REPO / "targets").glob("*.py")}
    for f in (REPO / "targets").glob("*.py"):
        names = imports(f)
        others = {n for n in names if n in modules and n not in SHARED_TARGET_TOOLS}
        if f.name != "__init__.py":  # the table imports every target; nothing else may
            assert not others, f"{f.name} imports {others}"
        orchestration = {n for n in names if n.startswith("pipeline.") and n not in PIPELINE_LEAVES
                         and not any(n.startswith(leaf + ".") for leaf in PIPELINE_LEAVES)}
        assert not orchestration, f"{f.name} imports {orchestration}"


def test_pipeline_reaches_targets_only_through_the_table_and_the_contract():
    """No handle on a target module, so no capability can be discovered by getattr on one."""
    for f in py_files("pipeline"):
        reach = {n for n in imports(f) if n.startswith("targets")}
        assert reach <= {"targets", "targets.base", "targets.TARGETS", "targets.get_target"} | {
            f"targets.base.{x}" for x in ("Artifact", "Availability", "BuildRequest", "CalibrationData",
                                           "LabelledData", "Runner", "Target", "Int8Recipe", "LayerProbe")}, \
            f"{f.relative_to(REPO)} reaches {reach}"


def test_every_table_row_is_a_declared_target():
    from targets import TARGETS
    from targets.base import Target

    for name, t in TARGETS.items():
        assert isinstance(t, Target) and t.name == name
        assert t.options.__dataclass_params__.frozen and "float_layers" in t.options.__dataclass_fields__
        assert t.peer_default is None or t.peer_default in {r.name for r in t.int8_recipes}


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


def test_no_function_takes_more_than_eight_parameters():
    for f in py_files("pipeline", "targets"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - int(bool(a.args) and a.args[0].arg in ("self", "cls"))
                assert n <= 8, f"{f.relative_to(REPO)}:{node.lineno} {node.name} takes {n} parameters"


def test_the_deploy_reads_in_one_screen():
    assert len((REPO / "pipeline" / "deploy.py").read_text().splitlines()) <= 200
