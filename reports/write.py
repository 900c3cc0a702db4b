"""Publish a report directory atomically: build it under a temporary name, then swap it into place whole."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from convnext_deploy.pipeline.core.cache import publish_dir
from convnext_deploy.reports.html_page import render_html
from convnext_deploy.reports.markdown_page import render_markdown
from convnext_deploy.reports.plots import plot_png, sensitivity_png


def write_report(out_dir: Path, report: dict, files: list[Path] = (), manifest: str | None = None,
                 blobs: dict[str, bytes] | None = None) -> Path:
    """`files`: the artifacts (linked or copied under artifacts/); `blobs`: name → bytes of other files of the run
    (an emulated device's reference outputs)."""
    def build(tmp: Path) -> None:
        art = tmp / "artifacts"
        art.mkdir()
        for f in files:
            if f.is_dir():  # a Core ML .mlpackage
                shutil.copytree(f, art / f.name)
                continue
            try:
                os.link(f, art / f.name)  # same filesystem: no copy of large engines
            except OSError:
                shutil.copy2(f, art / f.name)
        if manifest is not None:
            (tmp / "manifest.json").write_text(manifest)
        for name, data in (blobs or {}).items():
            (tmp / name).write_bytes(data)
        if report.get("sensitivity"):
            sens = sensitivity_png(report["sensitivity"])
            if sens:
                (tmp / "sensitivity.png").write_bytes(sens)
        png = plot_png(report)
        if png:
            (tmp / "accuracy_vs_latency.png").write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(report))
        (tmp / "report.html").write_text(render_html(report, png))
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))  # last: its presence means complete

    return publish_dir(Path(out_dir), build)
