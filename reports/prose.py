"""The sentences of a report: captions and bullet lines, in Markdown (the HTML page strips the emphasis)."""
from __future__ import annotations

from convnext_deploy.reports.cells import counts, ms, pct, pp


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
    if "layers" not in m:  # not judged (an emulated device: no speed to judge it on)
        return [m["why"] + "."]
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
    lines += [f"| {op} | {ms(ref['by_op_ms'].get(op))} | {ms(int8['by_op_ms'].get(op))} |" for op in ops]
    lines += ["", "Slowest INT8 nodes: " + ", ".join(f"{n['node']} ({n['op']}, {n['ms']:.2f} ms)" for n in int8["top_nodes"][:5]) + "."]
    return lines


def recipe_caption(report: dict) -> str:
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


def memory_caption(report: dict) -> str:
    mem = report["memory"]
    steps = "; ".join(f"{k} {v:.0f} s" for k, v in (report.get("decide_steps_s") or {}).items())
    return (f"Peak resident memory and wall time of the deploy process per stage ({mem['method']}; toolchains run in "
            f"the process; a child process, such as an emulated device's, by the kernel's record of its own peak). "
            f"Whole deploy: {mem['peak_rss_mib']:.0f} MiB"
            + (f" ({mem['tree_peak_rss_mib']:.0f} MiB with its largest child process)"
               if mem.get("tree_peak_rss_mib", mem["peak_rss_mib"]) > mem["peak_rss_mib"] else "")
            + (f", {mem['seconds']:.0f} s" if mem.get("seconds") else "")
            + (f". Estimated before the export (pipeline/measure/footprint.py, one FP32 forward timed here): "
               f"{report['plan']['peak_mib']:.0f} MiB, {report['plan']['seconds']:.0f} s"
               if report.get("plan") else "")
            + (f". Inside decide: {steps}." if steps else "."))


def summary_lines(report: dict) -> list[str]:
    m, d = report["model"], report["data"]
    lines = [  # the verdict, the artifact to ship, target and machine come first (glance.py), not again here
        f"- Model: {m['name']} ({m['num_classes']} classes), checkpoint `{m['checkpoint']}` "
        f"({m['checkpoint_format']}, sha256 `{m['checkpoint_sha256'][:16]}…`)",
        f"- Accuracy task: {d['task']}, measured at the checkpoint's own resolution **{d['accuracy_resolution']} px** "
        f"on {d['evaluation']['n']} images of `{d['evaluation']['source']}`; calibrated on {d['calibration']['n']} "
        f"images of `{d['calibration']['source']}` (disjoint; manifest.json)",
        (f"- Latency: measured at the deployment resolution **{d['latency_resolution']} px** (and at "
         f"{d['accuracy_resolution']} px); weights' values do not change the cost" if report["latency"] else
         "- Latency: **not measured** (see the notes)"),
        (f"- Export: ONNX opset {report['export']['opset']}, parity vs torch max |Δlogit| "
         f"{report['export']['parity']['max_abs_diff']:.2e}, top-1 agreement "
         f"{pct(report['export']['parity']['top1_agreement'])} on {report['export']['parity']['n']} calibration images"
         if "opset" in report["export"] else f"- Conversion: {report['export']['converter']} (no ONNX involved)"),
    ]
    for note in report.get("notes", []):
        lines.append(f"- Note: {note}")
    return lines


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
                     f"{counts(pc)}; {'meets' if pc.get('passed') else 'misses'} the gates ({pc.get('rule', '')}).")
        lines += _fallback_lines(fb) if fb["triggered"] else ["  No layer needed float."]
    return lines


def _fallback_lines(fb: dict) -> list[str]:
    lines = [f"  {fb.get('message', '')}. Method kept: {fb.get('method', '')}. "
             f"Layers in float ({len(fb['float_layers'])}): {', '.join(fb['float_layers']) or 'none'}."]
    ev = fb.get("evaluation")
    if ev:
        lines.append(f"  Re-measured on the evaluation split ({ev['n']} images): top-1 drop "
                     f"{pp(ev['plain_top1_drop_pp'])} (all INT8) → **{pp(ev['final_top1_drop_pp'])}**, "
                     f"agreement {pct(ev['plain_agreement'])} → {pct(ev['final_agreement'])}.")
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
        lines.append(f"  Compared: {r['method']}: control {counts(r)}, {r['float_layers']} float layers, p50 {r['p50_ms']:.2f} ms, "
                     f"built in {r['build_seconds']:.0f} s{' — kept' if r['kept'] else ''}.")
    return lines




def screen_caption(report: dict) -> str:
    s = report["recipe_screen"]
    return (f"Every INT8 candidate was first built on a slice of the model (blocks per stage {s['slice_depths']} of "
            f"{s['variant_depths']}, {s['slice_parameters'] / 1e6:.1f} M parameters, calibrated on "
            f"{s['calibration_images']} images) and timed at {s['input_size']} px, batch {s['batch']}, interleaved "
            f"with the slice's reference on this CPU (its p50 {s['reference_p50_ms']:.2f} ms). Built in full: the "
            f"default and those within {s['margin']:.0%} of the fastest, at most {s['shortlist']}. Real figures, of "
            "the slice: the full model's are in the tables below.")
