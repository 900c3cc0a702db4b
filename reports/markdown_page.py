"""report.md: the verdict and the artifact to ship first, then every figure with what measured it."""
from __future__ import annotations

from convnext_deploy.reports.cells import md_table
from convnext_deploy.reports.device_section import DEVICE_HEAD, device_caption, device_rows
from convnext_deploy.reports.glance import key_facts, verdict
from convnext_deploy.reports.prose import (
    choice_caption,
    memory_caption,
    method_lines,
    mixed_lines,
    recipe_caption,
    screen_caption,
    summary_lines,
    time_lines,
)
from convnext_deploy.reports.tables import (
    ARTIFACT_HEAD,
    CHOICE_HEAD,
    FALLBACK_HEAD,
    GATE_HEAD,
    LAT_HEAD,
    LAYER_HEAD,
    MEMORY_HEAD,
    RECIPE_HEAD,
    SCREEN_HEAD,
    SENS_HEAD,
    acc_head,
    accuracy_caption,
    accuracy_rows,
    artifact_rows,
    choice_rows,
    fallback_rows,
    gate_rows,
    gates_caption,
    latency_caption,
    latency_rows,
    layer_tables,
    memory_rows,
    recipe_rows,
    screen_rows,
    sensitivity_rows,
)


def glance_lines(report: dict) -> list[str]:
    _, headline, reasons = verdict(report)
    return [f"**{headline}**", "", *(f"- {r}" for r in reasons), *([""] if reasons else []),
            *(f"- {label}: {text}" for label, text in key_facts(report))]


def _artifact_notes(report: dict) -> list[str]:
    parts = []
    for a in report["artifacts"]:
        if a["metadata"].get("build", {}).get("accuracy_control") is not None:
            reverted = a["metadata"].get("reverted_to_float", [])
            parts += [f"**{a['precision']}** accuracy control (max drop {a['metadata']['build']['accuracy_control'] * 100:.2f} pp "
                      f"on the control set) returned {len(reverted)} layer(s) to float: {', '.join(reverted) or 'none'}.", ""]
        ops = a["metadata"].get("ops")
        if ops and "integer_kernel_count" in ops:
            parts += [f"**{a['precision']}** executed graph: {ops.get('integer_kernel_count', 0)} integer kernels "
                      f"{ops.get('integer_kernels', {})}, {ops.get('float_conv_matmul_left', 0)} float Conv/MatMul/Gemm left.", ""]
    return parts


def render_markdown(report: dict) -> str:
    m = report["model"]
    fallback = fallback_rows(report)
    parts = [f"# convnext-deploy report: {m['name']} on {report['target']['name']}", "", *glance_lines(report), "",
             f"Created {report['created']} by {report['tool']}.", "", *summary_lines(report), "",
             "## Accuracy", "", accuracy_caption(report), "",
             md_table(acc_head(report, runtime=False), accuracy_rows(report, runtime=False)), "",
             *(["## On the device", "", device_caption(report), "",
                *([md_table(DEVICE_HEAD, device_rows(report)), ""] if device_rows(report) else [])]
               if device_caption(report) else []),
             "## Latency", "", *([latency_caption(report), "", md_table(LAT_HEAD, latency_rows(report))]
                                 if report["latency"] else ["Not measured (see the notes above)."]), "",
             "## Gates", "", f"From {gates_caption(report)}.", "", md_table(GATE_HEAD, gate_rows(report)), "",
             "## INT8 methods", "", *method_lines(report), "",
             *([md_table(FALLBACK_HEAD, fallback), ""] if fallback else []),
             *(["## Where the time goes", "", *time_lines(report), ""] if time_lines(report) else []),
             *(["## INT8 candidates screened", "", screen_caption(report), "", md_table(SCREEN_HEAD, screen_rows(report)),
                ""] if report.get("recipe_screen") else []),
             *(["## INT8 recipe chosen on this CPU", "", choice_caption(report), "",
                *([md_table(CHOICE_HEAD, choice_rows(report)), ""] if choice_rows(report) else [])]
               if report.get("recipe_choice") else []),
             *(["## Latency-aware precision", "", *mixed_lines(report), ""] if mixed_lines(report) else []),
             *(["## INT8 recipes compared", "", recipe_caption(report), "",
                md_table(RECIPE_HEAD, recipe_rows(report)), ""] if report.get("int8_recipes") else []),
             *(["## Memory", "", memory_caption(report), "", md_table(MEMORY_HEAD, memory_rows(report)), ""]
               if memory_rows(report) else []),
             "## Artifacts", "", md_table(ARTIFACT_HEAD, artifact_rows(report)), "", *_artifact_notes(report)]
    if report.get("sensitivity"):
        body = sensitivity_markdown(report["sensitivity"]).split("\n", 1)[1]
        parts += ["## Per-layer sensitivity (INT8)", "", "![per-layer SQNR](sensitivity.png)", body]
    tables = layer_tables(report)
    if tables:
        parts += ["## Per-layer precision", ""]
        for title, rows in tables:
            parts += [f"**{title}**", "", *([md_table(LAYER_HEAD, rows), ""] if rows else [])]
    return "\n".join(parts)


def sensitivity_caption(result: dict) -> str:
    return (f"Measured on {result['images']} images of the calibration split ({result['source']}), {result['runtime']} "
            f"({result['kind']}). INT8 top-1 agreement with the all-float graph: "
            f"{result['int8_agreement_with_float'] * 100:.2f}%, logit SQNR {result.get('logit_sqnr_db') or 0:.1f} dB. "
            f"Layer SQNR: each layer's output in the INT8 graph against {result.get('float_reference') or 'the same graph with every layer in float'} "
            "(errors accumulate along the network). Sorted by the logit SQNR gained when only that layer is left in "
            "float, then by the agreement regained, then by layer SQNR."
            + (f" Within its {result['budget_s']:.0f}-second budget {result['probed']} of {len(result['layers'])} layers "
               "were probed alone, worst SQNR first; the rest follow by SQNR."
               if result.get("probed", len(result["layers"])) < len(result["layers"]) else ""))


def sensitivity_markdown(result: dict) -> str:
    return "\n".join([f"# Per-layer sensitivity: INT8 on {result['target']}", "", sensitivity_caption(result), "",
                      md_table(SENS_HEAD, sensitivity_rows(result)), ""])
