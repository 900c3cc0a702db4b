"""BENCHMARKS.md from the committed `make bench` results, `benchmarks/<cpu>-<date>/*.json`, newest first.

Plain JSON → Markdown: nothing is measured or imported from a toolchain here. A speed ratio belongs to the CPU it
was measured on (its INT8 and BF16 kernels differ by ISA) and to the library versions, so every table is headed by
one line naming the date, the CPU (model name, family/model), its ISA and the versions its figures came from, and a
result file lacking any of these is refused in one line naming the file and the field: such a figure could not be
compared with another machine's. `tests/test_benchmarks_doc.py` keeps the committed BENCHMARKS.md equal to what
this module makes of the committed results, so the document cannot drift from them.

    python -m convnext_deploy.reports.benchmarks [--root DIR] [--check]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convnext_deploy.reports.cells import peak_figures, rate_vs_peak

DOC = "BENCHMARKS.md"
RESULTS = "benchmarks"
# What a result file must carry (dotted: a key inside a key); cpu_family/cpu_model may be null (ARM), not absent.
REQUIRED = ("date", "command", "machine", "machine.cpu", "machine.cpu_family", "machine.cpu_model", "machine.flags",
            "machine.int8_path", "machine.bf16_path", "machine.threads", "versions", "versions.torch", "rows")
ROW_REQUIRED = ("target", "variant", "input_size", "threads", "batch", "runtime", "p50_ms", "ratios")
ISA_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX-512 BF16", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16", "asimd": "NEON",
             "asimddp": "NEON dot-product", "i8mm": "I8MM", "bf16": "ARM BF16"}


class ResultFileError(ValueError):
    """A result file this document cannot use: not JSON, or missing what its figures must be named with."""


def check(result, where: str) -> dict:
    if not isinstance(result, dict):
        raise ResultFileError(f"{where}: not a bench result (a JSON object with date, machine, versions and rows); "
                              "an older bench wrote a bare list of rows: re-run `make bench`")
    for key in REQUIRED:
        node = result
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ResultFileError(f"{where}: missing {key!r}: every figure must name the CPU, its ISA, the library "
                                      "versions and the date; re-run `make bench` (it writes them)")
            node = node[part]
    if not result["rows"] or not isinstance(result["rows"], list):
        raise ResultFileError(f"{where}: 'rows' is empty: no figure to show")
    for i, row in enumerate(result["rows"]):
        missing = [k for k in ROW_REQUIRED if k not in row]
        if missing:
            raise ResultFileError(f"{where}: row {i} lacks {', '.join(missing)}")
    return result


def load(root: Path) -> list[tuple[str, dict]]:
    """(path relative to root, result) of every benchmarks/*/*.json, newest first."""
    found = []
    for f in sorted(f for f in (Path(root) / RESULTS).glob("*/*.json") if not f.name.startswith("scale-")):
        rel = f.relative_to(root).as_posix()
        try:
            data = json.loads(f.read_text())
        except ValueError as e:
            raise ResultFileError(f"{rel}: not valid JSON ({e})") from None
        found.append((rel, check(data, rel)))
    return sorted(found, key=lambda item: (item[1]["date"], item[0]), reverse=True)


def cpu_text(m: dict) -> str:
    if m["cpu_family"] is None:
        return f"{m['cpu']} (family/model not reported by this kernel)"
    gen = f": {m['generation']}" if m.get("generation") else ""
    return f"{m['cpu']} (family {m['cpu_family']}, model {m['cpu_model']}{gen})"


def isa_text(m: dict) -> str:
    flags = set(m["flags"])
    listed = ", ".join(ISA_NAMES.get(f, f) for f in m["flags"]) or "none of the INT8/BF16 extensions"
    bf16 = "native" if flags & {"avx512_bf16", "amx_bf16", "bf16"} else "emulated"
    if "asimd" in flags:  # ARM: its INT8 paths are the dot-product and I8MM instructions, not VNNI/AMX
        dot, i8mm = "yes" if "asimddp" in flags else "no", "yes" if "i8mm" in flags else "no"
        return f"{listed} (dot-product {dot}, I8MM {i8mm}, BF16 {bf16})"
    vnni = "yes" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "no"
    amx = "yes" if flags & {"amx_int8", "amx_bf16"} else "no"
    return f"{listed} (VNNI {vnni}, AMX {amx}, BF16 {bf16})"


def short_isa(m: dict) -> str:
    flags = set(m["flags"])
    amx = ", AMX" if flags & {"amx_int8", "amx_bf16"} else ", no AMX"
    vnni = "VNNI" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "no VNNI"
    if "asimd" in flags:
        amx = ", I8MM" if "i8mm" in flags else ", no I8MM"
        vnni = "dot-product" if "asimddp" in flags else "no dot-product"
    best = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags else "no SIMD"
    bf16 = "BF16 native" if flags & {"avx512_bf16", "amx_bf16", "bf16"} else "BF16 emulated"
    return f"{best}, {vnni}{amx}, {bf16}"


def _ms(row: dict, k: str) -> str:
    ms = row["p50_ms"][k]
    if ms is None:
        return "proxy: not timed"
    ci = row.get("p50_ci_ms", {}).get(k)
    return f"{ms:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{ms:.2f}"


def _ratio(q: dict | None) -> str:
    if q is None:
        return "—"
    text = f"{q['value']:.2f}× [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]"
    return text + ("" if q.get("resolved", True) else " unresolved")


def render_row(row: dict, result: dict) -> list[str]:
    m, first = result["machine"], next(iter(row["p50_ms"]))
    versions = ", ".join(v for v in (row["runtime"], f"torch {result['versions']['torch']}") if v)
    out = [(f"### {row['target']} · {row['variant']} · {row['input_size']} px · batch {row['batch']} · "
            f"{row['threads']} threads"), "",
           f"*Measured {result['date']} on {cpu_text(m)} · ISA: {short_isa(m)} · {versions}*", "",
           f"| precision | p50 ms [95 %] | speed-up vs {first} [95 %] | top-1 | drop vs {first} |",
           "|---|---|---|---|---|"]
    for k in row["p50_ms"]:
        top1 = f"{row['top1'][k] * 100:.2f} %" if "top1" in row else "—"
        drop = "—" if "drop_pp" not in row or k == first else f"{row['drop_pp'][k]:+.2f} pp"
        out.append(f"| {k} | {_ms(row, k)} | {_ratio(row['ratios'].get(f'{k} vs {first}'))} | {top1} | {drop} |")
    out.append("")
    for name, q in row["ratios"].items():
        if not name.endswith(f" vs {first}"):
            out.append(f"- speed-up {name}: {_ratio(q)} ({q.get('verdict', '')})")
    acc = (f"top-1 on {row['eval']['n']} images of {row['eval']['split']} at {row['eval']['input_size']} px"
           if "eval" in row else f"top-1 not measured (weights {row.get('weights', 'unknown')})")
    rounds = (f"{row['rounds']} undisturbed rounds over {row['instances']} loads of every artifact, "
              f"{row.get('disturbed_rounds', 0)} disturbed rounds left out" if row.get("rounds") else "not timed")
    out.append(f"- {acc}; {rounds}" + (f"; peak RSS {row['peak_rss_mib']:.0f} MiB" if row.get("peak_rss_mib") else ""))
    out += distance_lines(row) + stream_lines(row)
    out += [f"- note: {n}" for n in row.get("skipped", [])]
    return out + [""]


def distance_lines(row: dict) -> list[str]:
    """Each runner's effective MAC rate (the model's multiply-accumulates at batch 1 over its p50) as a fraction of
    the runtime's own peak of that precision, measured in the same run; a rate above its peak is flagged as a bad
    peak, never written as a share above 100 % (reports.cells.rate_vs_peak)."""
    if not row.get("mac_rate"):
        return []
    peak = row["peak"]
    head = (f"- distance to the runtime's peak ({row['macs'] / 1e9:.2f} G multiply-accumulates an image; peak: "
            f"{peak['gemm']} through {peak.get('runtime', row['runtime'])}, {peak_figures(peak)}):")
    return [head] + [f"  - {k}: {rate_vs_peak(v)}" for k, v in row["mac_rate"].items()]


def stream_lines(row: dict) -> list[str]:
    if not row.get("throughput"):
        return []
    return ["- throughput (images/s, median of interleaved rounds [lowest, highest]): " + "; ".join(
        f"{k} {v['images_per_s']:.1f} [{v['range'][0]:.1f}, {v['range'][1]:.1f}]" for k, v in row["throughput"].items())]


def render_result(path: str, result: dict) -> list[str]:
    m, v = result["machine"], result["versions"]
    minutes = f", {result['minutes']:g} minutes" if result.get("minutes") is not None else ""
    return [f"## {result['date']} · {cpu_text(m)}", "",
            f"`{path}`: `{result['command']}` ({result.get('mode', 'default')}{minutes})", "",
            f"- CPU: {cpu_text(m)}; {m.get('cores') or '?'} cores, {m['threads']} threads used",
            f"- ISA: {isa_text(m)}; INT8 path: {m['int8_path']}; BF16: {m['bf16_path']}",
            "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- Date: {result['date']}", "",
            *[line for row in result["rows"] for line in render_row(row, result)]]


def document(root: Path) -> str:
    """BENCHMARKS.md as the committed results under `root` make it: the bench results, then the scale results."""
    from convnext_deploy.reports import scale_table

    return render(load(root), scale_table.load(root))


def render(results: list[tuple[str, dict]], scale: list[tuple[str, dict]] = ()) -> str:
    lines = ["# Benchmarks", "",
             ("Generated by `make benchmarks` (`python -m convnext_deploy.reports.benchmarks`) from the result files "
              f"under `{RESULTS}/` (a folder per CPU and date, written by `make bench` or `make bench-full`), newest "
              "first. Do not edit by hand: `tests/test_benchmarks_doc.py` fails when this file is not what the "
              "results generate."), "",
             ("How to read a table: p50 latency at batch 1 with its 95 % bootstrap interval; speed-up A vs B = "
             "p50(B) / p50(A), from one interleaved measurement of every row of the table, with its 95 % interval "
             "over the paired rounds and the loads of the artifacts (\"unresolved\": the time budget ended before it "
             "was within ±3 %); top-1 on the reference task and its drop against the table's first precision on the "
             "same images. Proxy rows (TensorRT, Core ML off their device) give accuracy only. A figure holds for "
             "the CPU, ISA, versions and date named above its table, not for another machine."), ""]
    if not results:
        return "\n".join(lines + ["No results yet: `make bench` writes one.", ""])
    lines += ["| result | date | CPU | ISA | rows |", "|---|---|---|---|---|"]
    lines += [f"| `{p}` | {r['date']} | {cpu_text(r['machine'])} | {short_isa(r['machine'])} | "
              + ", ".join(f"{row['target']} · {row['variant']}" for row in r["rows"]) + " |" for p, r in results]
    lines.append("")
    for path, result in results:
        lines += render_result(path, result)
    from convnext_deploy.reports import scale_table

    lines += scale_table.render(list(scale), cpu_text)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convnext_deploy.reports.benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the repository root, holding benchmarks/ (default: here)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if BENCHMARKS.md is not up to date")
    args = ap.parse_args(argv)
    root = Path(args.root)
    try:
        results = load(root)
        text = document(root)
    except (ResultFileError, ValueError) as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 2
    doc = root / DOC
    if args.check:
        same = doc.exists() and doc.read_text() == text
        print(f"{doc}: {'up to date' if same else 'differs from the results: run `make benchmarks`'}")
        return 0 if same else 1
    doc.write_text(text)
    print(f"written: {doc} ({len(results)} result files, {sum(len(r['rows']) for _, r in results)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
