"""The report's device section (`deploy --device`): the shipped artifacts' figures on the device's own kernels,
each row labelled with how it was measured ("emulated ARM Neoverse-V1", or native), beside the host's."""
from __future__ import annotations

DEVICE_HEAD = ["precision", "measured", "top-1", "INT8 vs reference", "agrees with this machine", "max abs Δ / range",
               "executed there", "runtime settings there"]


def device_caption(report: dict) -> str:
    d = report.get("device") or {}
    if not d:
        return ""
    if d["measured"] == "native":
        return (f"Device {d['name']} ({d['description']}): this machine takes its INT8 path ({d['int8_path']}), so "
                "every figure of this report, speed included, is the device's.")
    return (f"Device {d['name']} ({d['description']}), {d['label']}: {d['emulator']}, the runtime's own "
            f"{d['arch']} wheel, on {d['images']}. Emulation gives the device's numerics, not its speed: its speed "
            f"gates read \"not measured (emulated)\", and the latency section is this machine's. The accuracy gates "
            f"read these rows (INT8 path there: {d['int8_path']}). {d['seconds']:.0f} s under emulation.")


def device_rows(report: dict) -> list[list[str]]:
    d = report.get("device") or {}
    rows = []
    for p, a in (d.get("accuracy") or {}).items():
        host = a["vs_host"]
        vs_ref = (f"drop {a['top1_drop_pp']:+.2f} pp ({a['drop_images']:+d} images), agree {a['agree']:,}/{a['n']:,}"
                  if "agree" in a else "—")
        settings = ", ".join(f"{k} {v}" for k, v in (a.get("settings") or {}).items()) or "—"
        rows.append([p, a["label"], f"{a['top1'] * 100:.2f}% ({a['correct']:,}/{a['n']:,})", vs_ref,
                     f"{host['top1_agree']:,}/{host['n']:,}",
                     f"{host['max_abs_diff']:.3g} / {host['max_abs_diff_of_range'] * 100:.1f}%",
                     a["precision_executed"], settings])
    return rows


def device_fact(report: dict) -> str | None:
    """One line for the page's key facts."""
    d = report.get("device") or {}
    if not d:
        return None
    if d["measured"] == "native":
        return f"{d['name']} ({d['description']}): native, measured here"
    int8 = (d.get("accuracy") or {}).get("int8")
    return (f"{d['name']} ({d['description']}): {d['label']} on {d['n']:,} images"
            + (f", INT8 top-1 {int8['correct']:,}/{int8['n']:,}" if int8 else "") + "; speed not measured (emulated)")
