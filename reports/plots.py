"""The report's plots as PNG bytes (matplotlib, file-only backend). Every point carries its interval, and the
axes span at least the gate, so a difference within the noise does not look like one."""
from __future__ import annotations

import io

from convnext_deploy.reports.cells import measured_by, wilson

MIN_HALF_SPAN_PP = 0.5  # accuracy axis: at least ±0.5 pp around the reference, wider where the gate is wider
# label offsets (points) tried in turn around a marker; the first whose box meets no other label or marker wins
OFFSETS = [(6, 5), (6, -12), (-13, 5), (-13, -12), (10, -3), (-18, -3), (-3, 11), (-3, -19),
           (16, 12), (16, -20), (-24, 12), (-24, -20), (24, -3), (-30, -3)]


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


def _points(report: dict) -> list[dict]:
    """One point per artifact (deployment size, batch 1) and per other INT8 recipe on the evaluation split, with
    the intervals the report holds: p50's bootstrap interval, top-1's Wilson interval from its counts."""
    size, acc = report["data"]["latency_resolution"], report["accuracy"]
    points = []
    for e in report["latency"]:
        if e["batch"] == 1 and e["input_size"] == size and e["precision"] in acc:
            a = acc[e["precision"]]
            points.append({"label": f"{e['precision']} ({e['kind']})", "x": e["p50_ms"], "xci": e.get("p50_ci_ms"),
                           "top1": a["top1"], "n": a["n"], "correct": a.get("correct"), "kind": e["kind"]})
    choice = {c["recipe"]: c for c in (report.get("recipe_choice") or {}).get("candidates", [])}
    recipes = report.get("int8_recipes", [])
    shown_as_int8 = [r for r in recipes if r.get("deployed")] or recipes[:1]  # the int8 artifact's own recipe
    for r in recipes:
        if r in shown_as_int8 or r.get("split", "evaluation") != "evaluation":
            continue  # a control-split top-1 is of other images: not on this axis
        same_timing = "recipe choice" in r.get("timed_in", "")
        points.append({"label": f"int8 recipe: {r['recipe']} ({r['kind']})", "x": r["p50_ms"],
                       "xci": choice.get(r["recipe"], {}).get("p50_ci_ms") if same_timing else None,
                       "top1": r["top1"], "n": r["n"], "correct": None, "kind": r["kind"], "alt": True})
    for p in points:
        lo, hi = wilson(p["correct"] if p["correct"] is not None else round(p["top1"] * p["n"]), p["n"])
        p.update(y=p["top1"] * 100, ylo=lo * 100, yhi=hi * 100)
    return points


def _overlaps(box, taken) -> int:
    return sum(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in taken)


def _place_labels(ax, fig, points: list[dict]) -> None:
    """Number each point beside its marker where the number meets no other number or marker (greedy, in pixels)."""
    scale = fig.dpi / 72
    xy = [ax.transData.transform((p["x"], p["y"])) for p in points]
    taken = [(x - 4, y - 4, x + 4, y + 4) for x, y in xy]
    for i, (p, (px, py)) in enumerate(zip(points, xy)):
        w, h = 7 * len(str(i + 1)) * scale, 9 * scale
        boxes = [(px + o[0] * scale, py + o[1] * scale, px + o[0] * scale + w, py + o[1] * scale + h) for o in OFFSETS]
        best = min(range(len(OFFSETS)), key=lambda k: (_overlaps(boxes[k], taken), k))
        off = OFFSETS[best]
        taken.append(boxes[best])
        ax.annotate(str(i + 1), (p["x"], p["y"]), textcoords="offset points", xytext=off, fontsize=8,
                    color=p["colour"], fontweight="bold",
                    arrowprops={"arrowstyle": "-", "color": p["colour"], "lw": 0.6} if max(map(abs, off)) > 12 else None)


def plot_png(report: dict) -> bytes | None:
    """Accuracy (top-1 at checkpoint size) against latency (p50, deployment size, batch 1), one point per artifact."""
    plt = _pyplot()
    points = _points(report) if report["latency"] else []
    if plt is None or not points:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 4.6), dpi=110)
    colours = plt.get_cmap("tab10").colors
    for i, p in enumerate(points):
        p["colour"] = colours[i % len(colours)]
        xerr = [[p["x"] - p["xci"][0]], [p["xci"][1] - p["x"]]] if p["xci"] else None
        ax.errorbar([p["x"]], [p["y"]], xerr=xerr, yerr=[[p["y"] - p["ylo"]], [p["yhi"] - p["y"]]], capsize=3,
                    fmt="x" if p.get("alt") else ("o" if p["kind"] == "real" else "^"), ms=6, color=p["colour"],
                    elinewidth=0.9, label=f"{i + 1}  {p['label']}")
    ref = report["accuracy"].get(report["target"]["reference"])
    gate = report["gates"].get("applied", {}).get("max_top1_drop_pp")
    centre = ref["top1"] * 100 if ref else sum(p["y"] for p in points) / len(points)
    half = max(MIN_HALF_SPAN_PP, gate or 0) * 1.2
    ax.set_ylim(min(centre - half, *(p["ylo"] for p in points)) - 0.1, max(centre + half, *(p["yhi"] for p in points)) + 0.1)
    ax.set_xlim(0, max((p["xci"] or [0, p["x"]])[1] for p in points) * 1.15)  # from zero: distances read as ratios
    if ref and gate is not None:
        ax.axhline(centre - gate, color="#b00", ls="--", lw=0.8)
        ax.annotate(f"gate: top-1 drop ≤ {gate:g} pp vs {report['target']['reference'].upper()}", (0, centre - gate),
                    xycoords=("axes fraction", "data"), xytext=(4, -11), textcoords="offset points", fontsize=7, color="#b00")
    lat = next(e for e in report["latency"] if e["input_size"] == report["data"]["latency_resolution"])
    ax.set_xlabel(f"p50 latency, ms ({report['data']['latency_resolution']} px, batch 1, {lat['threads']} threads; "
                  "bars: 95 % CI)")
    ax.set_ylabel(f"top-1 % ({report['data']['accuracy_resolution']} px, {report['data']['evaluation']['n']:,} images;"
                  " bars: 95 % Wilson)", fontsize=8)
    ax.set_title(f"{report['model']['name']} on {report['target']['name']}\n"
                 + measured_by({e["precision"]: e for e in report["latency"]}), fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False, title="point (precision, real/proxy)",
              title_fontsize=7)
    fig.tight_layout()
    _place_labels(ax, fig, points)
    return _png(plt, fig, ax)


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
    ax.set_title(f"INT8 per-layer SQNR on {result['target']} ({result['images']} calibration images; {result['runtime']}, "
                 f"{result['kind']})", fontsize=8)
    return _png(plt, fig, ax)
