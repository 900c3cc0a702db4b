import pytest

from pipeline.errors import UserError
from pipeline.gates import check, load_gates


def _write(tmp_path, text):
    p = tmp_path / "gates.toml"
    p.write_text(text)
    return p


def test_scopes_override_in_order(tmp_path):
    p = _write(tmp_path, """
[defaults]
max_top1_drop_pp = 0.3
min_int8_speedup = 1.2
[target.onnxruntime]
min_int8_speedup = 1.5
[target.onnxruntime.variant.t]
max_p50_ms = 40
""")
    assert load_gates(p, "onnxruntime", "t") == {"max_top1_drop_pp": 0.3, "min_int8_speedup": 1.5, "max_p50_ms": 40}
    assert load_gates(p, "onnxruntime", "atto") == {"max_top1_drop_pp": 0.3, "min_int8_speedup": 1.5}
    assert load_gates(p, "openvino", "t") == {"max_top1_drop_pp": 0.3, "min_int8_speedup": 1.2}


def test_missed_gate_fails_with_measured_and_allowed():
    v = check({"max_top1_drop_pp": 0.3, "min_int8_speedup": 2.0},
              {"top1_drop_pp": 0.45, "int8_speedup": 2.5}, proxy=False)
    by = {x.gate: x for x in v}
    assert by["max_top1_drop_pp"].status == "fail" and by["max_top1_drop_pp"].measured == 0.45
    assert "measured 0.45pp, allowed <= 0.3pp" in by["max_top1_drop_pp"].line()
    assert by["min_int8_speedup"].passed


def test_unmeasured_figure_never_passes():
    v = check({"max_p50_ms": 1000.0}, {"p50_ms": None}, proxy=False)
    assert v[0].status == "not measured" and not v[0].passed


def test_proxy_figures_fail_unless_allowed():
    figures = {"top1_drop_pp": 0.0}
    assert check({"max_top1_drop_pp": 0.3}, figures, proxy=True)[0].status == "proxy not allowed"
    assert check({"max_top1_drop_pp": 0.3, "allow_proxy": True}, figures, proxy=True)[0].passed


def test_bad_gate_files(tmp_path):
    with pytest.raises(UserError, match="gate file not found"):
        load_gates(tmp_path / "none.toml", "onnxruntime", "t")
    with pytest.raises(UserError, match="not valid TOML"):
        load_gates(_write(tmp_path, "[defaults\n"), "onnxruntime", "t")
    with pytest.raises(UserError, match="unknown gate 'max_drop'"):
        load_gates(_write(tmp_path, "[defaults]\nmax_drop = 1\n"), "onnxruntime", "t")


def test_repository_gate_file_loads():
    from conftest import REPO

    gates = load_gates(REPO / "gates.toml", "onnxruntime", "atto")
    assert gates["max_top1_drop_pp"] <= 0.5 and "min_int8_speedup" in gates
