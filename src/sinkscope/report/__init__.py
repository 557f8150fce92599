"""See it: a self-contained HTML report of a run folder, and publication-quality figures.

- `write_report(run_or_folder, out=None, extra=None)` writes `report.html`: a layer × head grid of sink strength,
  the token view (raw vs detect-mask-renormalise), per-layer curves, the run's tables and sections that analyses
  contribute through `register_section`.
- `sinkscope.report.figures.profile` (matplotlib): heatmaps, attention maps, token strips, trace and evaluation curves.
- The report reads run folders and never runs a model (`sinkscope.analyses.maps` captures the short prompts'
  attention maps for it). A folder is verified, then read a piece at a time (`report.source`): what covers every
  prompt is reduced over batches of rows, per-prompt views read their prompts only (the first ones, or
  `prompts=[ids]`), so memory does not grow with the number of prompts.
"""

from sinkscope.report.data import ReportLimits
from sinkscope.report.page import REPORT_FILE, build_html, write_report
from sinkscope.report.sections import (
    Section,
    SectionContent,
    register_section,
    registered_sections,
    table_html,
    unregister_section,
)

__all__ = [
    "REPORT_FILE",
    "ReportLimits",
    "Section",
    "SectionContent",
    "build_html",
    "register_section",
    "registered_sections",
    "table_html",
    "unregister_section",
    "write_report",
]
