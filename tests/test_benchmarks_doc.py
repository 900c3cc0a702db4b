"""BENCHMARKS.md is generated from the committed results under benchmarks/ and says, with every figure, what it was
measured on: the CPU (model name, family/model), its ISA, the library versions and the date."""
import copy
import json
import re

import pytest

from convnext_deploy.reports import benchmarks as doc

from conftest import REPO


def test_the_committed_document_is_what_the_committed_results_generate():
    """A hand edit of BENCHMARKS.md, or a result added without `make benchmarks`, fails here."""
    results = doc.load(REPO)
    assert results, "no result under benchmarks/: `make bench` writes one"
    assert (REPO / "BENCHMARKS.md").read_text() == doc.document(REPO), \
        "BENCHMARKS.md is not what benchmarks/*/*.json generate: run `make benchmarks`"
    for path, _ in results:
        assert re.fullmatch(r"benchmarks/[a-z0-9-]+-\d{4}-\d{2}-\d{2}/[\w-]+\.json", path), path


def result(date: str = "2026-01-15", cpu: str = "Testium Xeon 9000", family: int | None = 6, model: int | None = 207,
           runtime: str = "openvino 2031.1") -> dict:
    row = {"target": "openvino", "variant": "t", "input_size": 224, "threads": 2, "batch": 1, "runtime": runtime,
           "p50_ms": {"fp32": 48.25, "bf16": 20.5, "int8 ours (default)": 17.75, "int8 nncf defaults": 18.0},
           "p50_ci_ms": {"fp32": [48.0, 48.5], "bf16": [20.25, 20.75], "int8 ours (default)": [17.5, 18.0],
                         "int8 nncf defaults": [17.75, 18.25]},
           "ratios": {"bf16 vs fp32": {"value": 2.35, "ci95": [2.3, 2.4], "resolved": True, "verdict": "faster"},
                      "int8 ours (default) vs fp32": {"value": 2.72, "ci95": [2.7, 2.75], "resolved": True,
                                                      "verdict": "faster"},
                      "int8 nncf defaults vs fp32": {"value": 2.68, "ci95": [2.6, 2.8], "resolved": False,
                                                     "verdict": "faster"},
                      "int8 ours (default) vs int8 nncf defaults": {"value": 1.01, "ci95": [0.98, 1.04],
                                                                   "resolved": True, "verdict": "no clear difference"}},
           "top1": {"fp32": 0.9, "bf16": 0.9, "int8 ours (default)": 0.8995, "int8 nncf defaults": 0.899},
           "drop_pp": {"fp32": 0.0, "bf16": 0.0, "int8 ours (default)": 0.05, "int8 nncf defaults": 0.1},
           "eval": {"split": "fashion-mnist/test", "n": 2000, "input_size": 32}, "rounds": 20, "instances": 5,
           "disturbed_rounds": 1, "peak_rss_mib": 3900.0, "skipped": []}
    return {"format": "convnext-deploy bench 2", "date": date, "mode": "default",
            "command": "python -m convnext_deploy.pipeline.bench", "minutes": 7.5,
            "machine": {"cpu": cpu, "cpu_family": family, "cpu_model": model, "generation": None, "cores": 2,
                        "threads": 2, "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"],
                        "int8_path": "AMX-INT8 tiles (and AVX-512 VNNI)", "bf16_path": "AMX-BF16"},
            "versions": {"python": "3.12.1", "torch": "2.99.0", "numpy": "3.0.1", "openvino": "2031.1", "nncf": "9.9.9"},
            "settings": {}, "rows": [row]}


def write(root, folder: str, data) -> None:
    (root / "benchmarks" / folder).mkdir(parents=True, exist_ok=True)
    (root / "benchmarks" / folder / "bench.json").write_text(json.dumps(data))


def test_every_figure_is_rendered_under_its_cpu_isa_versions_and_date(tmp_path):
    write(tmp_path, "testium-xeon-9000-f6m207-2026-01-15", result())
    text = doc.render(doc.load(tmp_path))
    head = "*Measured 2026-01-15 on Testium Xeon 9000 (family 6, model 207) · ISA: AVX-512, VNNI, AMX, BF16 native · " \
           "openvino 2031.1, torch 2.99.0*"
    assert head in text
    assert "- Versions: python 3.12.1, torch 2.99.0, numpy 3.0.1, openvino 2031.1, nncf 9.9.9" in text
    assert "AMX-INT8 tiles" in text and "(VNNI yes, AMX yes, BF16 native)" in text
    # every figure of the table sits below that line, in the same section
    section = text[text.index("### openvino · t"):]
    assert section.index(head) < section.index("| int8 ours (default) | 17.75 [17.50, 18.00] | 2.72× [2.70, 2.75] | "
                                               "89.95 % | +0.05 pp |")
    assert "| int8 nncf defaults | 18.00 [17.75, 18.25] | 2.68× [2.60, 2.80] unresolved |" in section
    assert "- speed-up int8 ours (default) vs int8 nncf defaults: 1.01× [0.98, 1.04] (no clear difference)" in section
    assert "top-1 on 2000 images of fashion-mnist/test at 32 px; 20 undisturbed rounds over 5 loads" in section


def test_a_rate_above_its_peak_is_rendered_as_a_bad_peak(tmp_path):
    """Never a share above 100 %: a result from before the peak's forms (one GEMM, Zen 3's OpenVINO INT8 run in its
    slow u8 GEMM kernel) and a result whose peak records its forms render each rate against the peak it came from,
    a rate above it as a bad peak."""
    old = result()
    old["rows"][0].update(macs=4_455_000_000, peak={"threads": 2, "gemm": "a 2048×2048×2048 GEMM, 2 threads",
                                                    "fp32": {"gmacs": 86.6, "ms": 99.2},
                                                    "int8": {"gmacs": 89.1, "ms": 96.4}},
                          mac_rate={"fp32": {"gmacs": 68.1, "of": "fp32", "peak_gmacs": 86.6, "fraction": 0.786},
                                    "int8 ours (default)": {"gmacs": 121.7, "of": "int8", "peak_gmacs": 89.1,
                                                            "fraction": 1.365}})
    new = result("2026-02-01")
    forms = {"gemm": {"form": "GEMM", "gmacs": 89.1, "ran": "int8"},
             "conv1x1": {"form": "1×1 convolution", "gmacs": 150.0, "ran": "fp32",
                         "reason": "executed in fp32, not INT8: Convolution f32 (jit_avx2_f32)"}}
    new["rows"][0].update(macs=4_455_000_000, peak={"threads": 2, "gemm": "a 2048³ product as a GEMM and as a 1×1 "
                                                    "convolution", "fp32": {"gmacs": 86.6, "form": "GEMM"},
                                                    "int8": {"gmacs": 89.1, "form": "GEMM"}, "absent": {},
                                                    "forms": {"int8": forms}},
                          mac_rate={"int8 ours (default)": {"gmacs": 121.7, "of": "int8", "peak_gmacs": 89.1,
                                                            "peak_form": "GEMM", "fraction": None, "bad_peak": True}})
    write(tmp_path, "testium-2026-01-15", old)
    write(tmp_path, "testium-2026-02-01", new)
    text = doc.render(doc.load(tmp_path))
    bad = "- int8 ours (default): 122 G/s, above the measured INT8 peak of 89 G/s: the peak is wrong (bad peak)"
    assert text.count(bad) == 2 and "- fp32: 68 G/s = 79 % of the FP32 peak" in text and "137 %" not in text
    assert ("INT8 89 G/s (GEMM; the 1×1 convolution executed in fp32, not INT8: Convolution f32 (jit_avx2_f32), "
            "150 G/s, not taken)") in text


def test_results_are_listed_newest_first_and_any_number_of_them(tmp_path):
    write(tmp_path, "old-cpu-f6m85-2025-03-01", result("2025-03-01", "Old CPU", 6, 85))
    write(tmp_path, "new-cpu-f6m207-2026-11-30", result("2026-11-30", "New CPU"))
    arm = result("2026-06-01", "Raspberry Pi 5 (ARM Cortex-A76)", None, None)
    arm["machine"]["flags"] = ["asimd", "asimddp"]
    write(tmp_path, "raspberry-pi-5-2026-06-01", arm)
    text = doc.render(doc.load(tmp_path))
    assert text.index("## 2026-11-30 · New CPU") < text.index("## 2026-06-01 · Raspberry") < text.index("## 2025-03-01")
    assert "Raspberry Pi 5 (ARM Cortex-A76) (family/model not reported by this kernel)" in text
    assert "ISA: NEON, dot-product, no I8MM, BF16 emulated" in text  # ARM INT8 paths, never x86 names
    assert text.count("### openvino · t") == 3 and doc.render([]).endswith("No results yet: `make bench` writes one.\n")


@pytest.mark.parametrize("drop", ["date", "machine.cpu", "machine.cpu_family", "machine.flags", "machine.int8_path",
                                  "versions", "versions.torch", "rows"])
def test_a_result_without_cpu_isa_versions_or_date_is_refused(tmp_path, drop, capsys):
    data = copy.deepcopy(result())
    node = data
    *parents, last = drop.split(".")
    for p in parents:
        node = node[p]
    del node[last]
    write(tmp_path, "testium-2026-01-15", data)
    with pytest.raises(doc.ResultFileError, match=re.escape(f"benchmarks/testium-2026-01-15/bench.json: missing {drop!r}")):
        doc.load(tmp_path)
    assert doc.main(["--root", str(tmp_path)]) == 2 and not (tmp_path / "BENCHMARKS.md").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "re-run `make bench`" in err


def test_an_older_bare_list_of_rows_and_broken_json_are_refused(tmp_path):
    write(tmp_path, "old-2026-01-01", result()["rows"])
    with pytest.raises(doc.ResultFileError, match="bare list of rows"):
        doc.load(tmp_path)
    (tmp_path / "benchmarks" / "old-2026-01-01" / "bench.json").write_text("{not json")
    with pytest.raises(doc.ResultFileError, match="not valid JSON"):
        doc.load(tmp_path)


def test_the_command_writes_the_document_and_check_says_when_it_is_stale(tmp_path):
    write(tmp_path, "testium-2026-01-15", result())
    assert doc.main(["--root", str(tmp_path), "--check"]) == 1
    assert doc.main(["--root", str(tmp_path)]) == 0 and doc.main(["--root", str(tmp_path), "--check"]) == 0
    write(tmp_path, "testium-2026-02-15", result("2026-02-15"))  # a new result without regeneration
    assert doc.main(["--root", str(tmp_path), "--check"]) == 1


def test_a_scale_row_of_a_target_without_latency_here_says_what_it_built_and_why():
    """TensorRT without a GPU, Core ML off macOS: the deploy reports no latency; its scale row keeps the stages and
    the memory, names the artifacts built and the INT8 accuracy's kind, and says why there is no latency."""
    from convnext_deploy.pipeline.bench_scale import _figures
    from convnext_deploy.reports.scale_table import render_row

    why = "latency not measured for fp32, int8: a proxy runs on this CPU, and its speed says nothing about the target"
    report = {"memory": {"stages": [{"stage": "build", "seconds": 12.0, "peak_rss_mib": 900.0,
                                     "tree_peak_rss_mib": 1500.0}], "peak_rss_mib": 900.0,
                         "tree_peak_rss_mib": 1500.0, "seconds": 12.0},
              "latency": [], "notes": ["something else", why],
              "artifacts": [{"precision": "fp32", "files": ["model.onnx"], "size_bytes": 10, "proxy": None},
                            {"precision": "int8", "files": ["model.plan"], "size_bytes": 5, "proxy": "ORT QDQ"}],
              "accuracy": {"int8": {"top1_drop_pp": 0.5, "agreement": 0.99, "n": 200, "kind": "proxy",
                                    "proxy": "ONNX Runtime on the same QDQ graph"}},
              "gates": {"passed": False}}
    row = {"variant": "b", "name": "ConvNeXt-B", "params": 88_591_464, "gmacs_224": None, "goal_mib": 4424,
           "exit_code": 3, **_figures(report)}
    assert "ratio" not in row and row["latency"] == "not measured here: " + why
    text = render_row(row)
    assert "build 12 s / 1.5 GiB" in text and why in text and "built: fp32, int8" in text
    assert "INT8 accuracy proxy (ONNX Runtime on the same QDQ graph)" in text and "exit 3" in text


def test_a_scale_table_names_every_variant_and_how_to_run_the_ones_missing():
    """A result with some variants measured keeps a row for each of T…XL; a later run of a variant replaces its
    row. At another resolution (the 384 px table: B) only what ran is listed."""
    from convnext_deploy.pipeline.bench_scale import with_unrun
    from convnext_deploy.reports.scale_table import render_row

    measured = {"variant": "b", "name": "ConvNeXt-B", "params": 88_591_464, "exit_code": 0}
    rows = with_unrun([measured], "openvino", 224)
    assert [r["variant"] for r in rows] == ["t", "s", "b", "l", "xl"] and rows[2] is measured
    xl = rows[4]
    assert xl["goal_mib"] == round(3 * 1024 + 4 * (4 * 350_196_968) / 2**20)  # 3 GiB + 4 × the FP32 weights
    assert xl["name"] == "ConvNeXt-XL"
    text = render_row(xl)
    assert "not in this result" in text and "`make bench-scale TARGET=openvino VARIANTS=xl`" in text
    assert "8.2 GiB" in text  # its memory goal, named though not measured
    again = with_unrun([r for r in rows if r["variant"] != "xl"] + [{**measured, "variant": "xl"}], "openvino", 224)
    assert len(again) == 5 and "not_run" not in again[4]
    assert with_unrun([measured], "onnxruntime", 384) == [measured]
