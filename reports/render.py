"""Markdown and HTML renderings of a report dict. Every figure is printed with what measured it."""
from __future__ import annotations

import base64
import html
import io


def _pct(x):
    return "—" if x is None else f"{x * 100:.2f}%"


def _pp(x):
    return "—" if x is None else f"{x:+.2f} pp"


def _ms(x):
    return "—" if x is None else f"{x:.2f}"


def accuracy_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, a in report["accuracy"].items():
        rows.append([name, a["runtime"], a["precision_executed"], str(a.get("input_size", "")), str(a["n"]),
                     _pct(a["top1"]), _pct(a["top5"]), _pct(a.get("agreement")), _pp(a.get("top1_drop_pp")),
                     _pp(a.get("vs_torch", {}).get("top1_drop_pp")), a["kind"] + (f": {a['proxy']}" if a.get("proxy") else "")])
    return rows


def acc_head(report: dict) -> list[str]:
    ref = report["target"].get("reference", "fp32").upper()  # the target's reference artifact (Core ML: FP16)
    return ["artifact", "runtime", "precision executed", "input px", "images", "top-1", "top-5",
            f"agreement vs {ref}", f"top-1 drop vs {ref}", "drop vs torch", "real/proxy"]


LAYER_HEAD = ["layer", "op", "weight shape", "weight", "input activation"]


def layer_tables(report: dict) -> list[tuple[str, list[list[str]]]]:
    """Per-layer precision of artifacts that record it (Core ML: read back from the package)."""
    out = []
    for a in report["artifacts"]:
        layers = a["metadata"].get("layers")
        if not layers:
            continue
        s = a["metadata"].get("layer_summary", {})
        title = (f"{a['precision']}: {s.get('int8_weights', 0)}/{s.get('conv_linear', len(layers))} conv/linear layers "
                 f"with INT8 weights, {s.get('int8_activations', 0)} with INT8 input activations; minimum deployment "
                 f"target {a['metadata'].get('minimum_deployment_target', '—')}")
        quantized = s.get("int8_weights", 0) or s.get("int8_activations", 0)
        out.append((title, [[r.get("module", r["layer"]), r["op"], "×".join(map(str, r["shape"])), r["weight"],
                             r["activation"]] for r in layers] if quantized else []))
    return out
LAT_HEAD = ["precision", "role", "input px", "batch", "threads", "p50 ms [95 % CI]", "p90 ms", "p99 ms", "img/s",
            "speed-up vs reference [95 % CI]", "rounds (loads; disturbed, left out)", "runtime", "real/proxy"]
GATE_HEAD = ["gate", "what", "measured", "allowed", "status"]


def _interval(value: str, ci) -> str:
    return value if not ci else f"{value} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _speedup(e: dict) -> str:
    q = e.get("speedup_vs_reference")
    if not q:
        return "—"
    return _interval(f"{q['value']:.2f}×", q["ci95"]) + ("" if q["verdict"] == "faster" else f" ({q['verdict']})")


def latency_rows(report: dict) -> list[list[str]]:
    return [[e["precision"], e["role"], str(e["input_size"]), str(e["batch"]), str(e["threads"]),
             _interval(_ms(e["p50_ms"]), e.get("p50_ci_ms")), _ms(e["p90_ms"]), _ms(e["p99_ms"]),
             f"{e['images_per_s']:.1f}", _speedup(e), _rounds(e), e["runtime"], e["kind"]]
            for e in report["latency"]]


def _rounds(e: dict) -> str:
    """How much measuring stands behind a latency row: undisturbed rounds, the loads they were spread over, and
    the rounds left out because the whole machine ran slower (pipeline.latency)."""
    text = f"{e.get('rounds', 1)} ({e.get('instances', 1)} loads"
    return text + (f"; {e['disturbed_rounds']} left out)" if e.get("disturbed_rounds") else ")")


def gate_rows(report: dict) -> list[list[str]]:
    rows = []
    for v in report["gates"]["verdicts"]:
        m = "—" if v["measured"] is None else f"{v['measured']:.4g}{v['unit']}"
        c = v.get("counts")
        if c:  # the images that decided, beside the percentage
            m += f" ({c['images']:,} of {c['n']:,} images; " + (f"{c['allowed']:,} allowed)" if "allowed" in c
                                                                 else f"{c['needed']:,} needed)")
        rows.append([v["gate"], v["description"], m, f"{v['comparison']} {v['allowed']:g}{v['unit']}",
                     v["status"] + (f": {v['reason']}" if v.get("reason") and v["status"] != "pass" else "")])
    return rows


RECIPE_HEAD = ["INT8 recipe", "top-1", "drop vs FP32", "agreement", "p50 ms", "speed-up vs FP32", "integer kernels",
               "float Conv/MatMul left"]


def recipe_rows(report: dict) -> list[list[str]]:
    return [[r["recipe"], _pct(r["top1"]) + (f" ({r['split']}, {r['n']:,})" if r.get("split", "evaluation") != "evaluation"
                                             else ""), _pp(r["top1_drop_pp"]), _pct(r["agreement"]), _ms(r["p50_ms"]),
             f"{r['int8_speedup']:.2f}×", str(sum((r["integer_kernels"] or {}).values())),
             str(r["float_conv_matmul_left"])] for r in report.get("int8_recipes", [])]


CHOICE_HEAD = ["candidate", "p50 ms [95 % CI]", "speed-up [95 % CI]", "control top-1 drop (images)",
               "control agreement (images)", "meets accuracy (rule)", "meets speed", "decision"]


def choice_rows(report: dict) -> list[list[str]]:
    return [[r["recipe"], _interval(_ms(r["p50_ms"]), r.get("p50_ci_ms")),
             _interval(f"{r['speedup']:.2f}×", r.get("speedup_ci95")), _count_pp(r), _count_pct(r),
             ("yes" if r["meets_accuracy"] else "no") + (f" ({r['accuracy_rule']})" if r.get("accuracy_rule") else ""),
             "yes" if r.get("meets_speed", True) else "no", ("**chosen**: " if r["chosen"] else "") + r["why"]]
            for r in (report.get("recipe_choice") or {}).get("candidates", [])]


def choice_caption(report: dict) -> str:
    c = report.get("recipe_choice") or {}
    if not c:
        return ""
    if c.get("mode") != "auto" or not c.get("candidates"):
        return f"INT8 recipe: {c['chosen']} ({c['why']})."
    r, prof = c["candidates"][0], c["cpu_profile"]
    text = (f"`--recipe auto` on {prof['cpu']} (INT8 path: {prof['int8_path']}): every candidate timed at "
            f"{report['data']['latency_resolution']} px, batch 1, {r['runs']} runs in {r.get('rounds', '?')} interleaved rounds with the reference "
            f"(p50 {r['reference_p50_ms']:.2f} ms){' (measurement reused from the cache: same CPU profile and artifacts)' if c.get('cached_measurement') else ''}; "
            f"accuracy judged on {_judged_on(c['accuracy_judged_on'])}; every gate judged at once "
            f"({', '.join(f'{k} {v}' for k, v in (c.get('gates_judged') or {}).items())}): {c.get('case', '')}. "
            f"Chosen: **{c['chosen']}**.")
    return text + (f" **{c['reason']}**" if c.get("reason") else "")


def _judged_on(j) -> str:
    if not isinstance(j, dict):
        return str(j)
    return (f"the control split ({j['n']:,} images" + (f", extended to {j['extended_n']:,} at a boundary"
                                                       if j.get("extended_n") else "") + f"); rule: {j['rule']}")


def mixed_lines(report: dict) -> list[str]:
    """Latency-aware precision: per layer, INT8 (kernel + the quantize feeding it) against the reference kernel."""
    m = (report.get("recipe_choice") or {}).get("mixed")
    if not m:
        return []
    times = m["layers"]
    lines = [f"Per-layer kernel time at {times.get('input_size', '?')} px, batch 1 ({times.get('source', '')}; an INT8 "
             "layer's time includes the QuantizeLinear feeding it). " + m["why"] + "."]
    slow = [r for r in times.get("rows", []) if not r["int8_pays"]]
    if slow:
        lines += ["", "| layer | op | reference ms | INT8 ms | of which input quantize |", "|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['op']} | {r['reference_ms']:.3f} | {r['int8_ms']:.3f} | {r['input_quantize_ms']:.3f} |"
                  for r in slow]
    return lines


def time_lines(report: dict) -> list[str]:
    """Where the time goes: the kernel time of the reference and the INT8 graph by kind and by op type."""
    split = report.get("where_the_time_goes")
    if not split:
        return []
    ref_name = report["target"]["reference"]
    ref, int8 = split[ref_name], split["int8"]
    lines = [f"Kernel time per image at {int8['input_size']} px, batch 1, {int8['threads']} threads ({int8['source']}; "
             f"mean of {int8['runs']} runs): {ref_name} {ref['total_ms']:.2f} ms, int8 {int8['total_ms']:.2f} ms — "
             + ", ".join(f"{k} {v:.2f} ms" for k, v in int8["by_kind_ms"].items()) + ".", "",
             "| op type | " + ref_name + " ms | int8 ms |", "|---|---|---|"]
    ops = list(dict.fromkeys([*int8["by_op_ms"], *ref["by_op_ms"]]))[:14]
    lines += [f"| {op} | {_ms(ref['by_op_ms'].get(op))} | {_ms(int8['by_op_ms'].get(op))} |" for op in ops]
    lines += ["", "Slowest INT8 nodes: " + ", ".join(f"{n['node']} ({n['op']}, {n['ms']:.2f} ms)" for n in int8["top_nodes"][:5]) + "."]
    return lines


def _recipe_caption(report: dict) -> str:
    rs = report.get("int8_recipes", [])
    if not rs:
        return ""
    r = next((x for x in rs if x.get("split", "evaluation") == "evaluation"), rs[0])
    control = [x for x in rs if x.get("split") == "control"]
    return (f"Accuracy on {r['n']} evaluation images at {report['data']['accuracy_resolution']} px"
            + (f" ({len(control)} candidates: their control-split figures from the recipe choice, marked, to spare "
               "an evaluation pass each at this size)" if control else "") + f"; p50 at "
            f"{r['input_size']} px, batch {r['batch']}, {r['threads']} threads, {r['runtime']}, interleaved with FP32 "
            f"(FP32 p50 {r['fp32_p50_ms']:.2f} ms) in one measurement"
            + (" (the recipe choice's)" if "recipe choice" in r.get("timed_in", "") else "") + ". All real.")


MEMORY_HEAD = ["stage", "peak RSS (MiB)", "RSS at start (MiB)", "seconds"]


def memory_rows(report: dict) -> list[list[str]]:
    mem = report.get("memory") or {}
    return [[r["stage"], f"{r['peak_rss_mib']:.0f}", "—" if r["start_rss_mib"] is None else f"{r['start_rss_mib']:.0f}",
             "—" if r.get("seconds") is None else f"{r['seconds']:.1f}"]
            for r in mem.get("stages", [])]


def memory_caption(report: dict) -> str:
    mem = report["memory"]
    steps = "; ".join(f"{k} {v:.0f} s" for k, v in (report.get("decide_steps_s") or {}).items())
    return (f"Peak resident memory and wall time of the deploy process per stage ({mem['method']}; toolchains run in "
            f"the process). Whole deploy: {mem['peak_rss_mib']:.0f} MiB" + (f", {mem['seconds']:.0f} s" if
                                                                           mem.get("seconds") else "")
            + (f". Inside decide: {steps}." if steps else "."))


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _summary_lines(report: dict) -> list[str]:
    m, d, mach = report["model"], report["data"], report["machine"]
    status = "PASSED" if report["gates"]["passed"] else "FAILED"
    lines = [
        f"- **Gates: {status}** ({report['gates']['file']})",
        f"- Model: {m['name']} ({m['num_classes']} classes), checkpoint `{m['checkpoint']}` "
        f"({m['checkpoint_format']}, sha256 `{m['checkpoint_sha256'][:16]}…`)",
        f"- Target: {report['target']['name']} — {report['target']['hardware']}",
        f"- Machine: {mach['cpu']} ({mach['cpu_count']} cores; {', '.join(mach['cpu_flags'])}), {mach['os']}"
        + (f"; INT8 path: {mach['cpu_profile']['int8_path']}; BF16: {mach['cpu_profile']['bf16_path']}"
           if mach.get("cpu_profile") else ""),
        f"- Accuracy task: {d['task']}, measured at the checkpoint's own resolution **{d['accuracy_resolution']} px** "
        f"on {d['evaluation']['n']} images of `{d['evaluation']['source']}`; calibrated on {d['calibration']['n']} "
        f"images of `{d['calibration']['source']}` (disjoint; manifest.json)",
        (f"- Latency: measured at the deployment resolution **{d['latency_resolution']} px** (and at "
         f"{d['accuracy_resolution']} px); weights' values do not change the cost" if report["latency"] else
         "- Latency: **not measured** (see the notes)"),
        (f"- Export: ONNX opset {report['export']['opset']}, parity vs torch max |Δlogit| "
         f"{report['export']['parity']['max_abs_diff']:.2e}, top-1 agreement {_pct(report['export']['parity']['top1_agreement'])}"
         if "opset" in report["export"] else f"- Conversion: {report['export']['converter']} (no ONNX involved)"),
    ]
    rec = report.get("recommended_precision")
    if rec:
        lines.append(f"- **Recommended here**: {rec['line']} (accuracy from the evaluation split)")
    for note in report.get("notes", []):
        lines.append(f"- Note: {note}")
    return lines


FALLBACK_HEAD = ["layers in float", "control top-1 drop", "control agreement", "rebuild + check (s)"]


def fallback_rows(report: dict) -> list[list[str]]:
    return [[str(r["float_layers"]), _count_pp(r), _count_pct(r), f"{r['seconds']:.1f}"]
            for r in (report.get("fallback") or {}).get("rounds", [])]


def _count_pp(r: dict) -> str:
    """A control-split drop as images lost of n, beside its percentage points."""
    if r.get("control_n") is None:
        return _pp(r.get("control_drop_pp"))
    return f"{r['control_drop_images']} of {r['control_n']:,} ({_pp(r['control_drop_pp'])})"


def _count_pct(r: dict) -> str:
    if r.get("control_n") is None:
        return _pct(r.get("control_agreement"))
    return f"{r['control_n'] - r['control_disagreements']:,} of {r['control_n']:,} ({_pct(r['control_agreement'])})"


def _counts(r: dict) -> str:
    if r.get("control_n") is None:
        return "not judged"
    return (f"top-1 drop {_count_pp(r)} [95 % {_pp(r['control_drop_low_pp'])}, {_pp(r['control_drop_high_pp'])}], "
            f"agreement {_count_pct(r)} [95 % {_pct(r['control_agreement_low'])}, {_pct(r['control_agreement_high'])}]")


def method_lines(report: dict) -> list[str]:
    """What this issue's INT8 methods did: outlier smoothing and the accuracy-bounded fallback, as measured."""
    lines = []
    sm = report.get("smoothing")
    if sm:
        lines.append(f"- **Outlier smoothing** (SmoothQuant-style, α {sm['alpha']}, from {sm['images']} calibration "
                     f"images): {sm['layers']} norm→layer pairs; largest norm-output channel range over the median "
                     f"{sm['outlier_ratio_before']:.1f} → {sm['outlier_ratio_after']:.1f} (worst: {sm['worst_layer_before']}). "
                     "The FP32 function is unchanged; the INT8 artifacts are built from the smoothed weights.")
    else:
        lines.append("- Outlier smoothing: off (INT8 built from the checkpoint's weights as they are).")
    fb = report.get("fallback")
    if fb:
        c, pc = fb["control"], fb.get("plain_control") or {}
        lines.append(f"- **Accuracy fallback**: decided on {c['n']} labelled images held out of `{c['source']}` "
                     f"(not in the evaluation figures); {fb.get('gates', '')}. All-INT8 on the control split: "
                     f"{_counts(pc)}; {'meets' if pc.get('passed') else 'misses'} the gates ({pc.get('rule', '')}).")
        if not fb["triggered"]:
            lines.append("  No layer needed float.")
        else:
            lines.append(f"  {fb.get('message', '')}. Method kept: {fb.get('method', '')}. "
                         f"Layers in float ({len(fb['float_layers'])}): {', '.join(fb['float_layers']) or 'none'}.")
            ev = fb.get("evaluation")
            if ev:
                lines.append(f"  Re-measured on the evaluation split ({ev['n']} images): top-1 drop "
                             f"{_pp(ev['plain_top1_drop_pp'])} (all INT8) → **{_pp(ev['final_top1_drop_pp'])}**, "
                             f"agreement {_pct(ev['plain_agreement'])} → {_pct(ev['final_agreement'])}.")
            lat = fb.get("latency")
            if lat:
                lines.append(f"  Latency cost ({lat['input_size']} px, batch 1, same interleaved rounds): p50 "
                             f"{lat['plain_p50_ms']:.2f} ms → {lat['final_p50_ms']:.2f} ms (**{lat['cost']:.2f}×**).")
            elif fb["float_layers"]:
                lines.append("  Latency cost: not measured (proxy; see the notes).")
            sp = fb.get("speed_after")
            if sp:
                lines.append(f"  Speed after the repair: {sp['value']:.2f}× the reference [{sp['ci95'][0]:.2f}, "
                             f"{sp['ci95'][1]:.2f}]" + ("" if sp["meets_speed"] else ": **misses the speed gates**") + ".")
            for r in fb.get("compared", []):
                lines.append(f"  Compared: {r['method']}: control {_counts(r)}, {r['float_layers']} float layers, p50 {r['p50_ms']:.2f} ms, "
                             f"built in {r['build_seconds']:.0f} s{' — kept' if r['kept'] else ''}.")
    return lines


def render_markdown(report: dict) -> str:
    m = report["model"]
    parts = [f"# convnext-deploy report: {m['name']} on {report['target']['name']}", "",
             f"Created {report['created']} by {report['tool']}.", "", *_summary_lines(report), "",
             "## Accuracy", "", _md_table(acc_head(report), accuracy_rows(report)), "",
             "## Latency", "", (_md_table(LAT_HEAD, latency_rows(report)) if report["latency"] else
                                "Not measured (see the notes above)."), "",
             "## Gates", "", _md_table(GATE_HEAD, gate_rows(report)), "",
             "## INT8 methods", "", *method_lines(report), "",
             *(["| " + " | ".join(FALLBACK_HEAD) + " |", "|" + "---|" * len(FALLBACK_HEAD),
                *("| " + " | ".join(r) + " |" for r in fallback_rows(report)), ""] if fallback_rows(report) else []),
             *(["## Where the time goes", "", *time_lines(report), ""] if time_lines(report) else []),
             *(["## INT8 recipe chosen on this CPU", "", choice_caption(report), "",
                *([_md_table(CHOICE_HEAD, choice_rows(report)), ""] if choice_rows(report) else [])]
               if report.get("recipe_choice") else []),
             *(["## Latency-aware precision", "", *mixed_lines(report), ""] if mixed_lines(report) else []),
             *(["## INT8 recipes compared", "", _recipe_caption(report), "",
                _md_table(RECIPE_HEAD, recipe_rows(report)), ""] if report.get("int8_recipes") else []),
             *(["## Memory", "", memory_caption(report), "", _md_table(MEMORY_HEAD, memory_rows(report)), ""]
               if memory_rows(report) else []),
             "## Artifacts", "",
             _md_table(["precision", "file", "size", "sha256"],
                       [[a["precision"], f, f"{a['size_bytes'] / 1e6:.2f} MB", a["sha256"][f]]
                        for a in report["artifacts"] for f in a["files"]]), ""]
    for a in report["artifacts"]:
        if a["metadata"].get("build", {}).get("accuracy_control") is not None:
            reverted = a["metadata"].get("reverted_to_float", [])
            parts += [f"**{a['precision']}** accuracy control (max drop {a['metadata']['build']['accuracy_control'] * 100:.2f} pp "
                      f"on the control set) returned {len(reverted)} layer(s) to float: {', '.join(reverted) or 'none'}.", ""]
        ops = a["metadata"].get("ops")
        if ops and "integer_kernel_count" in ops:
            parts += [f"**{a['precision']}** executed graph: {ops.get('integer_kernel_count', 0)} integer kernels "
                      f"{ops.get('integer_kernels', {})}, {ops.get('float_conv_matmul_left', 0)} float Conv/MatMul/Gemm left.", ""]
    if report.get("sensitivity"):
        body = sensitivity_markdown(report["sensitivity"]).split("\n", 1)[1]
        parts += ["## Per-layer sensitivity (INT8)", "", "![per-layer SQNR](sensitivity.png)", body]
    tables = layer_tables(report)
    if tables:
        parts += ["## Per-layer precision", ""]
        for title, rows in tables:
            parts += [f"**{title}**", "", *([_md_table(LAYER_HEAD, rows), ""] if rows else [])]
    return "\n".join(parts)


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(plt, fig, ax) -> bytes:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_png(report: dict) -> bytes | None:
    """Accuracy (top-1 at checkpoint size) against latency (p50, deployment size, batch 1), one point per artifact."""
    plt = _pyplot()
    if plt is None:
        return None
    size = report["data"]["latency_resolution"]
    points = []
    for e in report["latency"]:
        if e["batch"] == 1 and e["input_size"] == size and e["precision"] in report["accuracy"]:
            points.append((e["p50_ms"], report["accuracy"][e["precision"]]["top1"] * 100, e["precision"], e["kind"]))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for x, y, label, kind in points:
        ax.scatter([x], [y], s=60, marker="o" if kind == "real" else "^")
        ax.annotate(f"{label} ({kind})", (x, y), textcoords="offset points", xytext=(6, 4))
    for r in report.get("int8_recipes", [])[1:]:  # the alternatives, from their own interleaved measurement
        ax.scatter([r["p50_ms"]], [r["top1"] * 100], s=40, marker="x", color="grey")
        ax.annotate(r["recipe"], (r["p50_ms"], r["top1"] * 100), textcoords="offset points", xytext=(5, -10),
                    fontsize=7, color="grey")
    ax.set_xlabel(f"p50 latency, ms ({size} px, batch 1, {report['latency'][0]['threads']} threads)")
    ax.set_ylabel(f"top-1 % ({report['data']['accuracy_resolution']} px, {report['data']['evaluation']['n']} images)")
    ax.set_title(f"{report['model']['name']} on {report['target']['name']}")
    return _png(plt, fig, ax)


def _html_table(head, rows) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict, png: bytes | None) -> str:
    m = report["model"]
    title = f"convnext-deploy report: {m['name']} on {report['target']['name']}"
    summary = "".join(f"<li>{html.escape(line[2:]).replace('**', '')}</li>" for line in _summary_lines(report))
    img = (f'<img alt="accuracy vs latency" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else "<p>(no plot: matplotlib is not installed or no latency was measured)</p>")
    gate_rows_html = _html_table(GATE_HEAD, gate_rows(report))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f3f3f3}}.pass{{color:#070}}.fail{{color:#a00}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Created {html.escape(report['created'])} by {html.escape(report['tool'])}.</p>
<ul>{summary}</ul>
<h2>Accuracy vs latency</h2>{img}
<h2>Gates</h2>{gate_rows_html}
<h2>Accuracy</h2>{_html_table(acc_head(report), accuracy_rows(report))}
<h2>Latency</h2>{_html_table(LAT_HEAD, latency_rows(report))}
<h2>INT8 methods</h2><ul>{"".join(f"<li>{html.escape(line.strip()[2:] if line.startswith('- ') else line.strip()).replace('**', '')}</li>" for line in method_lines(report))}</ul>
{_html_table(FALLBACK_HEAD, fallback_rows(report)) if fallback_rows(report) else ""}
{"<h2>Where the time goes</h2><pre>" + html.escape(chr(10).join(time_lines(report))) + "</pre>" if time_lines(report) else ""}
{f"<h2>INT8 recipe chosen on this CPU</h2><p>{html.escape(choice_caption(report)).replace('**', '')}</p>" + (_html_table(CHOICE_HEAD, [[c.replace('**', '') for c in row] for row in choice_rows(report)]) if choice_rows(report) else "") if report.get("recipe_choice") else ""}
{"<h2>Latency-aware precision</h2><pre>" + html.escape(chr(10).join(mixed_lines(report))) + "</pre>" if mixed_lines(report) else ""}
{f"<h2>INT8 recipes compared</h2><p>{html.escape(_recipe_caption(report))}</p>" + _html_table(RECIPE_HEAD, recipe_rows(report)) if report.get("int8_recipes") else ""}
{f"<h2>Memory</h2><p>{html.escape(memory_caption(report))}</p>" + _html_table(MEMORY_HEAD, memory_rows(report)) if memory_rows(report) else ""}
<h2>Artifacts</h2>{_html_table(["precision", "file", "size", "sha256"],
                              [[a["precision"], f, f"{a['size_bytes'] / 1e6:.2f} MB", a["sha256"][f]]
                               for a in report["artifacts"] for f in a["files"]])}
{_sensitivity_html(report)}
{"".join(f"<h3>Per-layer precision: {html.escape(t)}</h3>" + (_html_table(LAYER_HEAD, rows) if rows else "") for t, rows in layer_tables(report))}
</body></html>
"""


SENS_HEAD = ["rank", "layer", "op", "layer SQNR dB", "float alone: agreement regained (pp)",
             "float alone: logit SQNR gain (dB, ranks)"]


def sensitivity_rows(result: dict) -> list[list[str]]:
    order = {name: i for i, name in enumerate(result.get("ranking", []))}  # the measuring side's ranking
    ranked = sorted(result["layers"], key=lambda r: order.get(r.get("module", r["layer"]), len(order)))
    return [[str(i + 1), r.get("module", r["layer"]), r["op"], f"{r['sqnr_db']:.1f}", f"{r['agreement_regained_pp']:+.2f}",
             f"{r.get('logit_sqnr_gain_db', 0.0):+.2f}"] for i, r in enumerate(ranked)]


def sensitivity_markdown(result: dict) -> str:
    return "\n".join([
        f"# Per-layer sensitivity: INT8 on {result['target']}", "",
        f"Measured on {result['images']} images of the calibration split ({result['source']}), {result['runtime']} "
        f"({result['kind']}). INT8 top-1 agreement with the all-float graph: "
        f"{result['int8_agreement_with_float'] * 100:.2f}%, logit SQNR {result.get('logit_sqnr_db') or 0:.1f} dB. "
        f"Layer SQNR: each layer's output in the INT8 graph against {result.get('float_reference') or 'the same graph with every layer in float'} "
        "(errors accumulate along the network). Sorted by the logit SQNR gained when only that layer is left in "
        "float, then by the agreement regained, then by layer SQNR.", "",
        _md_table(SENS_HEAD, sensitivity_rows(result)), ""])


def sensitivity_png(result: dict) -> bytes | None:
    """SQNR along the network, stages marked."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = result["layers"]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.plot([r["index"] for r in rows], [r["sqnr_db"] for r in rows], marker="o", ms=3)
    last = None
    for r in rows:
        if r["stage"] != last:
            ax.axvline(r["index"] - 0.5, color="grey", alpha=0.3)
            ax.annotate(r["stage"], (r["index"], ax.get_ylim()[1]), fontsize=7, va="top")
            last = r["stage"]
    worst = min(rows, key=lambda r: r["sqnr_db"])
    ax.annotate(worst.get("module", worst["layer"]), (worst["index"], worst["sqnr_db"]), fontsize=7,
                textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("quantized layer (network order)")
    ax.set_ylabel("SQNR of layer output, dB")
    ax.set_title(f"INT8 per-layer SQNR on {result['target']} ({result['images']} calibration images)")
    return _png(plt, fig, ax)


def _sensitivity_html(report: dict) -> str:
    result = report.get("sensitivity")
    if not result:
        return ""
    png = sensitivity_png(result)
    img = f'<img alt="per-layer SQNR" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    caption = sensitivity_markdown(result).split("\n")[2]
    return f"<h2>Per-layer sensitivity (INT8)</h2><p>{html.escape(caption)}</p>{img}" + _html_table(SENS_HEAD, sensitivity_rows(result))
