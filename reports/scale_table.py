"""The scale section of BENCHMARKS.md: every variant T…XL deployed as a user would (`make bench-scale`, results
`benchmarks/<cpu>-<date>/scale-<target>.json`), one row each, and why a row could not run where it could not."""
from __future__ import annotations

import json
from pathlib import Path

PATTERN = "scale-*.json"
FORMAT = "convnext-deploy scale 1"


def load(root: Path) -> list[tuple[str, dict]]:
    found = []
    for f in sorted((Path(root) / "benchmarks").glob(f"*/{PATTERN}")):
        data = json.loads(f.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{f}: not a {FORMAT!r} result")
        found.append((f.relative_to(root).as_posix(), data))
    return sorted(found, key=lambda item: (item[1]["date"], item[0]), reverse=True)


def _stages(row: dict) -> str:
    return "; ".join(f"{s['stage']} {s['seconds']:.0f} s / {s['peak_mib'] / 1024:.1f} GiB" for s in row["stages"])


def _interval(lo_hi) -> str:
    return f"[{lo_hi[0]:.1f}, {lo_hi[1]:.1f}]"


def render_row(row: dict) -> str:
    head = f"| {row['name']} | {row['params'] / 1e6:.0f} M | " + (f"{row['gmacs_224']:.1f}" if row.get("gmacs_224")
                                                                    else "—")
    if "not_run" in row:
        said = row["not_run"] if row.get("unrun") else f"not run: {row['not_run']}"  # unrun: a variant not in this file
        return head + f" | {said} | | {row['goal_mib'] / 1024:.1f} GiB | | | |"
    within = "within" if row["peak_mib"] <= row["goal_mib"] else "**over**"
    if "ratio" not in row:  # a proxy target: what it built, its accuracy's kind, and why no latency
        acc = row.get("int8_accuracy") or {}
        return (head + f" | {_stages(row)} | {row['seconds'] / 60:.1f} min, {row['peak_mib'] / 1024:.1f} GiB | "
                f"{row['goal_mib'] / 1024:.1f} GiB ({within}) | {row.get('latency', 'not measured here')} | | | "
                f"exit {row['exit_code']}; built: " + ", ".join(a["precision"] for a in row.get("artifacts", []))
                + (f"; INT8 accuracy {acc['kind']}" + (f" ({acc['proxy']})" if acc.get("proxy") else "")
                   if acc.get("kind") else "") + " |")
    return (head + f" | {_stages(row)} | {row['seconds'] / 60:.1f} min, {row['peak_mib'] / 1024:.1f} GiB | "
            f"{row['goal_mib'] / 1024:.1f} GiB ({within}) | {row['fp32_p50_ms']:.1f} {_interval(row['fp32_p50_ci_ms'])} | "
            f"{row['int8_p50_ms']:.1f} {_interval(row['int8_p50_ci_ms'])} | {row['ratio']:.2f}× "
            f"[{row['ratio_ci95'][0]:.2f}, {row['ratio_ci95'][1]:.2f}] | exit {row['exit_code']}"
            + (f", {row['recipe']}" if row.get("recipe") else "") + " |")


def render(results: list[tuple[str, dict]], cpu_text) -> list[str]:
    if not results:
        return []
    lines = ["## Every variant, as a user deploys it", "",
             "`make bench-scale`: one `convnext-deploy deploy` per variant, a process of its own, from a checkpoint in "
             "the official `.pth` layout with a 1,000-class head (a stand-in: initialised weights, trained-scale layer "
             "scales, a head fitted on the data's classes; pipeline/models/stand_in.py) on Fashion-MNIST written as "
             "ImageNet-style folders, with the settings named below and the defaults otherwise. Peaks are the process "
             "tree's (the deploy and its forked build children); the goal is 3 GiB + 4 × the FP32 weight bytes. p50 at "
             "the deployment size, batch 1, with 95 % intervals; the ratio is FP32 / INT8 from the deploy's own "
             "interleaved measurement.", ""]
    for path, r in results:
        size = r.get("image_size", 224)
        lines += [f"### {r['date']} · {cpu_text(r['machine'])} · {r['target']}" + (f" · {size} px" if size != 224 else ""),
                  "",
                  f"`{path}`: `{r['command']}`, `{r['settings']}`; INT8 path {r['machine']['int8_path']}; "
                  + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), "",
                  f"| variant | parameters | GMACs at {size} | stages: seconds / peak | whole deploy | memory goal | "
                  "FP32 p50 ms | INT8 p50 ms | FP32 / INT8 | outcome |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  *[render_row(row) for row in r["rows"]], ""]
    return lines
