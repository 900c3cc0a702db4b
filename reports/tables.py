"""The rows of a report's tables, one function per table, and the captions that name once what measured them."""
from __future__ import annotations

from convnext_deploy.reports.cells import (count_pct, count_pp, interval, measured_by, ms, pct, pp, rate_vs_peak,
                                           verdict_passed)


def accuracy_rows(report: dict, runtime: bool = True) -> list[list[str]]:
    """`runtime=False` where the table's caption names runtime and device once (accuracy_caption)."""
    rows = []
    for name, a in report["accuracy"].items():
        rows.append([name, *([a["runtime"]] if runtime else []), a["precision_executed"], str(a.get("input_size", "")),
                     str(a["n"]), pct(a["top1"]), pct(a["top5"]), pct(a.get("agreement")), pp(a.get("top1_drop_pp")),
                     pp(a.get("vs_torch", {}).get("top1_drop_pp")), a["kind"] + (f": {a['proxy']}" if a.get("proxy") else "")])
    return rows


def acc_head(report: dict, runtime: bool = True) -> list[str]:
    ref = report["target"].get("reference", "fp32").upper()  # the target's reference artifact (Core ML: FP16)
    return ["artifact", *(["runtime"] if runtime else []), "precision executed", "input px", "images", "top-1", "top-5",
            f"agreement vs {ref}", f"top-1 drop vs {ref}", "drop vs torch", "real/proxy"]


def accuracy_caption(report: dict) -> str:
    d = report["data"]
    return (f"Top-1 on {d['evaluation']['n']:,} images of {d['evaluation']['source']} at {d['accuracy_resolution']} px. "
            + measured_by(report["accuracy"]))


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
            "speed-up vs reference [95 % CI]", "rounds (loads; disturbed, left out)", "real/proxy"]


def _speedup(e: dict) -> str:
    q = e.get("speedup_vs_reference")
    if not q:
        return "—"
    return interval(f"{q['value']:.2f}×", q["ci95"]) + ("" if q["verdict"] == "faster" else f" ({q['verdict']})")


def _rounds(e: dict) -> str:
    """How much measuring stands behind a latency row: undisturbed rounds, the loads they were spread over, and
    the rounds left out because the whole machine ran slower (pipeline.measure.latency)."""
    text = f"{e.get('rounds', 1)} ({e.get('instances', 1)} loads"
    return text + (f"; {e['disturbed_rounds']} left out)" if e.get("disturbed_rounds") else ")")


def latency_rows(report: dict) -> list[list[str]]:
    return [[e["precision"], e["role"], str(e["input_size"]), str(e["batch"]), str(e["threads"]),
             interval(ms(e["p50_ms"]), e.get("p50_ci_ms")), ms(e["p90_ms"]), ms(e["p99_ms"]),
             f"{e['images_per_s']:.1f}", _speedup(e), _rounds(e), e["kind"]]
            for e in report["latency"]]


def latency_caption(report: dict) -> str:
    named = {f"{e['precision']} {e['input_size']} px batch {e['batch']}": e for e in report["latency"]}
    return (f"Interleaved rounds of warm blocks; speed-up = reference p50 / p50 over paired rounds. {measured_by(named)}"
            + peak_sentence(report))


def peak_sentence(report: dict) -> str:
    """The distance to the limit: each batch-1 row's multiply-accumulates per second against the runtime's own peak
    of that precision, both measured on this machine; a rate above the peak flags the peak as wrong (a bad peak),
    never a share above 100 % (reports.cells.rate_vs_peak)."""
    rated = [e for e in report["latency"] if e.get("mac_rate")]
    if not rated:
        return ""
    r0 = rated[0]["mac_rate"]
    return (f" Distance to the runtime's peak ({r0['macs'] / 1e9:.2f} G multiply-accumulates an image at "
            f"{rated[0]['input_size']} px; peak: {r0['peak']} through the same runtime): "
            + "; ".join(f"{e['precision']} {rate_vs_peak(e['mac_rate'], named=True)}" for e in rated) + ".")


GATE_HEAD = ["gate", "what", "measured", "allowed", "status"]


def gates_caption(report: dict) -> str:
    """Where the gates came from: the file, and the INT8 path whose [.path.<name>] scopes applied."""
    g = report["gates"]
    return g["file"] + (f", scopes for INT8 path {g['int8_path']}" if g.get("int8_path") else "")


def gate_rows(report: dict) -> list[list[str]]:
    rows = []
    for v in report["gates"]["verdicts"]:
        m = "—" if v["measured"] is None else f"{v['measured']:.4g}{v['unit']}"
        c = v.get("counts")
        if c:  # the images that decided, beside the percentage
            m += f" ({c['images']:,} of {c['n']:,} images; " + (f"{c['allowed']:,} allowed)" if "allowed" in c
                                                                 else f"{c['needed']:,} needed)")
        rows.append([v["gate"], v["description"], m, f"{v['comparison']} {v['allowed']:g}{v['unit']}",
                     v["status"] + (f": {v['reason']}" if v.get("reason") and not verdict_passed(v) else "")])
    return rows


RECIPE_HEAD = ["INT8 recipe", "top-1", "drop vs FP32", "agreement", "p50 ms", "speed-up vs FP32", "integer kernels",
               "float Conv/MatMul left"]


def recipe_rows(report: dict) -> list[list[str]]:
    return [[r["recipe"] + (" (deployed)" if r.get("deployed") else ""),
             pct(r["top1"]) + (f" ({r['split']}, {r['n']:,})" if r.get("split", "evaluation") != "evaluation" else ""),
             pp(r["top1_drop_pp"]), pct(r["agreement"]), ms(r["p50_ms"]), f"{r['int8_speedup']:.2f}×",
             str(sum((r["integer_kernels"] or {}).values())), str(r["float_conv_matmul_left"])]
            for r in report.get("int8_recipes", [])]


CHOICE_HEAD = ["candidate", "p50 ms [95 % CI]", "speed-up [95 % CI]", "control top-1 drop (images)",
               "control agreement (images)", "meets accuracy (rule)", "meets speed", "decision"]


def choice_rows(report: dict) -> list[list[str]]:
    return [[r["recipe"], interval(ms(r["p50_ms"]), r.get("p50_ci_ms")),
             interval(f"{r['speedup']:.2f}×", r.get("speedup_ci95")), count_pp(r), count_pct(r),
             ("not judged" if r["meets_accuracy"] is None else "yes" if r["meets_accuracy"] else "no")
             + (f" ({r['accuracy_rule']})" if r.get("accuracy_rule") and r["meets_accuracy"] is not None else ""),
             "yes" if r.get("meets_speed", True) else "no", ("**chosen**: " if r["chosen"] else "") + r["why"]]
            for r in (report.get("recipe_choice") or {}).get("candidates", [])]


MEMORY_HEAD = ["stage", "peak RSS (MiB)", "RSS at start (MiB)", "process tree peak (MiB)", "estimated (MiB)",
               "seconds", "estimated (s)"]


def memory_rows(report: dict) -> list[list[str]]:
    mem, planned = report.get("memory") or {}, ((report.get("plan") or {}).get("stages") or {})
    return [[r["stage"], f"{r['peak_rss_mib']:.0f}", "—" if r["start_rss_mib"] is None else f"{r['start_rss_mib']:.0f}",
             f"{r.get('tree_peak_rss_mib', r['peak_rss_mib']):.0f}",
             f"{planned[r['stage']]['peak_mib']:.0f}" if r["stage"] in planned else "—",
             "—" if r.get("seconds") is None else f"{r['seconds']:.1f}",
             f"{planned[r['stage']]['seconds']:.0f}" if r["stage"] in planned else "—"]
            for r in mem.get("stages", [])]


FALLBACK_HEAD = ["layers in float", "control top-1 drop", "control agreement", "rebuild + check (s)"]


def fallback_rows(report: dict) -> list[list[str]]:
    return [[str(r["float_layers"]), count_pp(r), count_pct(r), f"{r['seconds']:.1f}"]
            for r in (report.get("fallback") or {}).get("rounds", [])]


ARTIFACT_HEAD = ["precision", "file", "size", "sha256"]


def artifact_rows(report: dict) -> list[list[str]]:
    return [[a["precision"], f, f"{a['size_bytes'] / 1e6:.2f} MB", a["sha256"][f]]
            for a in report["artifacts"] for f in a["files"]]


SENS_HEAD = ["rank", "layer", "op", "layer SQNR dB", "float alone: agreement regained (pp)",
             "float alone: logit SQNR gain (dB, ranks)"]


def sensitivity_rows(result: dict) -> list[list[str]]:
    order = {name: i for i, name in enumerate(result.get("ranking", []))}  # the measuring side's ranking
    ranked = sorted(result["layers"], key=lambda r: order.get(r.get("module", r["layer"]), len(order)))
    return [[str(i + 1), r.get("module", r["layer"]), r["op"], f"{r['sqnr_db']:.1f}",
             *([f"{r['agreement_regained_pp']:+.2f}", f"{r.get('logit_sqnr_gain_db', 0.0):+.2f}"]
               if "agreement_regained_pp" in r else ["not probed (time budget)", "by SQNR"])]
            for i, r in enumerate(ranked)]


SCREEN_HEAD = ["INT8 candidate", "p50 ms on the slice", "speed-up vs its FP32", "built in full", "why"]


def screen_rows(report: dict) -> list[list[str]]:
    screen = report.get("recipe_screen") or {}
    return [[r["recipe"], f"{r['p50_ms']:.2f}", f"{r['speedup']:.2f}× [{r['speedup_ci95'][0]:.2f}, "
             f"{r['speedup_ci95'][1]:.2f}]", "yes" if r["built_in_full"] else "no", r["why"]]
            for r in screen.get("candidates", [])]
