"""MODEL_CARD.md of a bundle: what a device team needs to know about the model they ship, every figure read
from the run's report.json (with what measured it), never one the report does not hold."""
from __future__ import annotations

from convnext_deploy.reports.device_section import device_caption
from convnext_deploy.reports.glance import hardware_class
from convnext_deploy.reports.tables import acc_head, accuracy_rows, gate_rows


def _table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _latency_rows(report: dict, precisions: list[str]) -> list[list[str]]:
    keep = set(precisions) | {report["target"]["reference"]}
    return [[e["precision"], str(e["input_size"]), str(e["batch"]), f"{e['p50_ms']:.2f}", f"{e['p90_ms']:.2f}",
             f"{e['images_per_s']:.1f}", e["runtime"], e["device"], str(e["threads"]),
             e["kind"] + (f": {e['proxy']}" if e.get("proxy") else "")]
            for e in report["latency"] if e["precision"] in keep]


def _proxy_labels(report: dict, precisions: list[str]) -> list[str]:
    labels = {a["proxy"] for a in report["artifacts"] if a["precision"] in precisions and a.get("proxy")}
    labels |= {a["proxy"] for p, a in report["accuracy"].items() if p in precisions and a.get("proxy")}
    return sorted(labels)


def _limits(report: dict, precisions: list[str]) -> list[str]:
    m, mach, num = report["model"], report["machine"], report.get("int8_numerics")
    lines = [device_caption(report)] if report.get("device") else []
    if num and "int8" in precisions:
        lines.append(f"INT8 numerics were measured on {num['measured_on']} (INT8 path: {num['int8_path']}); "
                     "another ISA may round differently: run `convnext-deploy validate` on the device.")
    lines += report.get("notes", [])
    lines.append(f"Latency was measured on {mach['cpu']} ({mach['cpu_count']} cores) with the threads shown; "
                 "on the device it will differ (`validate` re-measures it there).")
    trained = m.get("trained_on") or {}
    if trained.get("name"):
        lines.append(f"Trained on {trained['name']} ({trained.get('train', '?')}, {trained.get('train_size', '?')} "
                     f"images at {trained.get('resolution', '?')} px): the accuracy above holds for images like those.")
    if report["data"]["task"].startswith("Fashion-MNIST"):
        lines.append("Fashion-MNIST images are grey: every input is converted to RGB first (three equal channels); "
                     "colour photographs are outside the training distribution.")
    return lines


def _input_line(row: dict) -> list[str]:
    """What the shipped model takes, as the artifact records it (targets.image_input)."""
    rule = (row.get("metadata") or {}).get("input") or {}
    if "rule" not in rule:
        return []
    return [f"- Input: {rule['rule']}; resize: {rule['resize']}; crop: {rule['crop']}"]


def render_model_card(report: dict, bundle: dict) -> str:
    """`bundle`: what the bundle holds: {"precisions": [...], "files": {precision: [names]}, "predict": bool,
    "reference": {"n": int, "source": str, "made_by": {precision: {runtime, device, precision_executed, proxy}}}}."""
    m, d, t = report["model"], report["data"], report["target"]
    precisions = bundle["precisions"]
    passed = report["gates"]["passed"]
    proxies = _proxy_labels(report, precisions)
    out = [f"# {m['name']} ({m['variant']}) for {t['name']}: {', '.join(p.upper() for p in precisions)}", ""]
    out.append(f"**Gates: {'PASSED' if passed else 'FAILED: do not ship'}** ({report['gates']['file']}); "
               f"made by {report['tool']} on {report['created']}.")
    if proxies:
        out.append("")
        out.append(f"**Figures from a proxy** ({'; '.join(proxies)}): not measured on {t['name']} itself; run "
                   "`convnext-deploy validate` on the device before shipping.")
    out += ["", "## Files", ""]
    art = {a["precision"]: a for a in report["artifacts"]}
    out.append(_table(["file", "precision", "sha256 (as measured)", "bytes"],
                      [[f, p, art[p]["sha256"][f], str(art[p]["size_bytes"])] for p in precisions
                       for f in bundle["files"][p]]))
    out += ["", "`labels.txt` (class names in output order), `preprocessing.json` (how to feed the model), "
            "`report.json` (the run this card is read from), `reference_outputs.npz` and `reference_images/` "
            "(inputs and expected outputs), `SHA256SUMS` (every file; `sha256sum -c SHA256SUMS`)"
            + (", `predict.py` (needs only the runtime, numpy and Pillow)." if bundle["predict"] else "."), ""]
    out += ["## Model", "",
            f"- {m['name']}, variant `{m['variant']}`, {m['num_classes']} classes",
            f"- Checkpoint `{m['checkpoint']}` ({m['checkpoint_format']}), sha256 `{m['checkpoint_sha256']}`",
            f"- Preprocessing: {m['preprocessing']['input_size']} px, crop_pct {m['preprocessing']['crop_pct']}, "
            f"{m['preprocessing']['interpolation']}, mean {m['preprocessing']['mean']}, std {m['preprocessing']['std']} "
            "(preprocessing.json)",
            *_input_line(art.get("int8") or {}),
            f"- Target: {t['name']} ({hardware_class(report)}); reference precision {t['reference']}", ""]
    out += ["## Accuracy", "",
            f"{d['task']}: {d['evaluation']['n']} images of `{d['evaluation']['source']}` at {d['accuracy_resolution']} px; "
            f"INT8 calibrated on {d['calibration']['n']} images of `{d['calibration']['source']}` (disjoint).", "",
            _table(acc_head(report), accuracy_rows(report)), ""]
    rows = _latency_rows(report, precisions)
    out += ["## Latency", ""]
    out += ([_table(["precision", "input px", "batch", "p50 ms", "p90 ms", "images/s", "runtime", "device",
                     "threads", "real/proxy"], rows)] if rows else ["**Not measured** (see the known limits)."])
    mach = report["machine"]
    prof = mach.get("cpu_profile") or {}
    out += ["", f"Measured on {mach['cpu']} ({mach['cpu_count']} cores; {', '.join(mach['cpu_flags'])}), {mach['os']}"
            + (f"; INT8 path: {prof['int8_path']}; BF16: {prof['bf16_path']}" if prof else "") + ".", ""]
    out += ["## Gates", "", (_table(["gate", "what", "measured", "allowed", "verdict"], gate_rows(report))
                             if report["gates"]["verdicts"] else "No gate was applied (the gate file sets none)."), ""]
    out += ["## Known limits", ""] + [f"- {line}" for line in _limits(report, precisions)] + [""]
    ref = bundle["reference"]
    out += ["## Check it on the device", "",
            f"`reference_outputs.npz` holds {ref['n']} images of `{ref['source']}` as the model's inputs and the "
            "outputs the bundled model gave on the kernels named ("
            + "; ".join(f"{p}: {w['runtime']} on {w['device']}, executed {w['precision_executed']}"
                        + (f", **proxy**: {w['proxy']}" if w.get("proxy") else "") for p, w in ref["made_by"].items())
            + ")" + ("; an emulated device's set, with the bundling machine's beside it (`host_outputs_*`): `validate` "
                     "compares with the set made on the INT8 path it runs on" if any(
                         w.get("kind") == "emulated" for w in ref["made_by"].values()) else "") + ".", "",
            "```", "sha256sum -c SHA256SUMS",
            *(["python predict.py reference_images/*.png        # top-5 per image; --json for machines"]
              if bundle["predict"] else []),
            "convnext-deploy validate .                        # checksums, reference outputs, local latency",
            "convnext-deploy validate . --images DIR           # + top-1 on labelled images (DIR/<class>/<image>)",
            "```", ""]
    return "\n".join(out)
