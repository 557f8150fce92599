"""See it: a self-contained HTML report of a run folder, and publication-quality figures.

- `write_report(run_or_folder, out=None, extra=None)` writes `report.html`: a layer × head grid of sink strength,
  the token view (raw vs detect-mask-renormalise), per-layer curves, the run's tables and sections that analyses
  contribute through `register_section`.
- `sinkscope.report.plots` (matplotlib): heatmaps, attention maps, token strips, trace and evaluation curves.
- `maps_table` / `capture_maps` / `add_maps`: the optional `maps` table of short prompts' full attention maps.
"""

from sinkscope.report.data import ReportLimits
from sinkscope.report.maps import add_maps, capture_maps, maps_table
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
    "add_maps",
    "build_html",
    "capture_maps",
    "maps_table",
    "register_section",
    "registered_sections",
    "table_html",
    "unregister_section",
    "write_report",
]
