"""The rules of ARCHITECTURE.md, checked on every module's imports and signatures."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

TOOLCHAINS = {"onnxruntime", "onnx", "openvino", "nncf", "tensorrt", "coremltools", "pycuda", "cuda", "modelopt"}
STDLIB_OK = {"__future__", "dataclasses", "hashlib", "json", "os", "pickle", "re", "tempfile", "pathlib", "typing",
             "math", "copy"}
PKG = "convnext_deploy"
SHARED_TARGET_TOOLS = {f"{PKG}.targets.{m}" for m in ("base", "qdq", "ort_tools", "coreml_proxy", "image_input",
                                                     "peak_graphs")} | {f"{PKG}.targets"}


def family(stem: str) -> str:
    """A target's helper is named after it: `openvino_nncf.py` belongs to `openvino_cpu.py` (family `openvino`)."""
    return stem.split("_")[0]


def target_modules() -> set[str]:
    """The stems of the modules that declare a table row (`TARGET = ...` at module level)."""
    return {f.stem for f in (REPO / "targets").glob("*.py")
            if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "TARGET" for t in n.targets)
                   for n in ast.parse(f.read_text()).body)}
# what a target may take from pipeline/: the core (errors, cache), the models and the machine profile
PIPELINE_LEAVES = {f"{PKG}.pipeline.core", f"{PKG}.pipeline.models", f"{PKG}.pipeline.measure.machine"}
# pipeline/'s rooms, each a job (ARCHITECTURE.md names each one)
PIPELINE_ROOMS = {"core", "models", "decisions", "measure", "stages", "ship", "device"}
PACKAGE_ROOMS = ("pipeline", "targets", "calibration", "reports")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module.startswith(PKG)}
    return names


def top(names):
    """The first name, or the room for a name of this package (convnext_deploy.targets.x → targets)."""
    return {n.split(".")[1] if n.startswith(PKG + ".") else n.split(".")[0] for n in names}


def py_files(*rooms):
    return [f for room in rooms for f in (REPO / room).rglob("*.py")]


def test_the_document_is_in_the_project_and_names_the_stages():
    doc = (REPO / "ARCHITECTURE.md").read_text()
    for stage in ("prepare", "plan", "export", "build", "decide", "finish", "validate", "gates", "report"):
        assert f"stages/{stage}.py" in doc and (REPO / "pipeline" / "stages" / f"{stage}.py").exists()


def test_pipeline_folders_are_the_rooms_of_the_document():
    doc = (REPO / "ARCHITECTURE.md").read_text()
    folders = {d.name for d in (REPO / "pipeline").iterdir() if (d / "__init__.py").exists()}
    assert folders == PIPELINE_ROOMS
    for room in PIPELINE_ROOMS:
        assert f"`pipeline/{room}/`" in doc, room
    loose = {f.name for f in (REPO / "pipeline").glob("*.py")}
    assert loose == {"__init__.py", "deploy.py", "cli.py", "bench.py", "bench_scale.py"}, "a module belongs in a room"


def test_no_module_name_means_two_things_and_none_is_over_300_lines():
    seen = {}
    for f in py_files(*PACKAGE_ROOMS):
        rel = f.relative_to(REPO)
        assert len(f.read_text().splitlines()) <= 300, f"{rel} is over 300 lines"
        if f.stem in ("__init__", "__main__"):
            continue
        assert f.stem not in seen, f"{rel} and {seen[f.stem]} share a name"
        seen[f.stem] = rel


@pytest.mark.parametrize("room", ["calibration", "reports"])
def test_calibration_and_reports_import_no_toolchain_and_no_target(room):
    for f in py_files(room):
        bad = top(imports(f)) & (TOOLCHAINS | {"targets"})
        assert not bad, f"{f.name} imports {bad}"


def test_targets_import_no_other_target_and_only_pipeline_leaves():
    """A target imports shared tools and its own helpers (`<family>_*.py`, never another row), nothing else."""
    modules = {f"{PKG}.targets.{f.stem}" for f in (REPO / "targets").glob("*.py")}
    rows = target_modules()
    families = [family(t) for t in rows]
    for f in (REPO / "targets").glob("*.py"):
        if f.stem != "__init__" and f"{PKG}.targets.{f.stem}" not in SHARED_TARGET_TOOLS and f.stem not in rows:
            assert families.count(family(f.stem)) == 1, f"{f.name} is neither a target, a shared tool nor one target's helper"
        names = imports(f)
        own_helpers = {n for n in names if n.split(".")[-1] not in rows and family(n.split(".")[-1]) == family(f.stem)}
        others = {n for n in names if n in modules and n not in SHARED_TARGET_TOOLS | own_helpers}
        if f.name != "__init__.py":  # the table imports every target; nothing else may
            assert not others, f"{f.name} imports {others}"
        orchestration = {n for n in names if n.startswith(f"{PKG}.pipeline") and n not in PIPELINE_LEAVES
                         and not any(n.startswith(leaf + ".") for leaf in PIPELINE_LEAVES)}
        assert not orchestration, f"{f.name} imports {orchestration}"


def test_pipeline_reaches_targets_only_through_the_table_and_the_contract():
    """No handle on a target module, so no capability can be discovered by getattr on one."""
    for f in py_files("pipeline"):
        reach = {n for n in imports(f) if n.startswith(f"{PKG}.targets")}
        assert reach <= {f"{PKG}.targets{x}" for x in ("", ".base", ".TARGETS", ".get_target", ".Finish", ".takes_image")} | {
            f"{PKG}.targets.base.{x}" for x in ("Artifact", "Availability", "BuildRequest", "CalibrationData",
                                           "LabelledData", "Runner", "Target", "Int8Recipe", "LayerProbe",
                                           "inference_batch", "peak_onnx")}, \
            f"{f.relative_to(REPO)} reaches {reach}"


def test_every_table_row_is_a_declared_target():
    from convnext_deploy.targets import TARGETS
    from convnext_deploy.targets.base import Target

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


@pytest.mark.parametrize("name", ["convnext.py", "checkpoints.py", "checkpoint_layouts.py", "variants.py"])
def test_model_and_checkpoint_code_import_only_torch_and_safetensors(name):
    allowed = {"torch", "safetensors", "pipeline"} | STDLIB_OK
    assert top(imports(REPO / "pipeline" / "models" / name)) <= allowed


def test_no_function_takes_more_than_eight_parameters():
    for f in py_files("pipeline", "targets"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - int(bool(a.args) and a.args[0].arg in ("self", "cls"))
                assert n <= 8, f"{f.relative_to(REPO)}:{node.lineno} {node.name} takes {n} parameters"


def test_the_deploy_reads_in_one_screen():
    assert len((REPO / "pipeline" / "deploy.py").read_text().splitlines()) <= 200


def test_the_package_list_is_every_folder_of_the_rooms():
    """pyproject.toml lists the packages by hand (the rooms map onto one name), so a new folder must be added."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {PKG} | {f"{PKG}." + ".".join(i.parent.relative_to(REPO).parts)
                     for room in PACKAGE_ROOMS for i in (REPO / room).rglob("__init__.py")}
    assert listed == found
