"""Turn a deploy's results (plain data) into report.json, report.md and a self-contained report.html."""
from convnext_deploy.reports.write import write_report  # noqa: F401
