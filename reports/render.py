"""The renderings of one report, under the names their callers import: report.md (markdown_page), report.html
(html_page), the plots (plots), and the table helpers the summary and the model card share (cells, tables)."""
from __future__ import annotations

from convnext_deploy.reports.cells import html_table as _html_table  # noqa: F401
from convnext_deploy.reports.cells import md_table as _md_table  # noqa: F401
from convnext_deploy.reports.html_page import render_html  # noqa: F401
from convnext_deploy.reports.markdown_page import render_markdown, sensitivity_markdown  # noqa: F401
from convnext_deploy.reports.plots import plot_png, sensitivity_png  # noqa: F401
from convnext_deploy.reports.tables import acc_head, accuracy_rows, gate_rows  # noqa: F401
