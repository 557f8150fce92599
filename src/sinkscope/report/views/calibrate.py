"""The report section of a `sinkscope calibrate` run: ACT's head search as accuracy per trial against the
uncalibrated accuracy, and the calibration and held-out accuracy before and after."""

from __future__ import annotations

import html

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.views import floats, grid, help_text, script, tables_of
from sinkscope.store import Run


@register_section("calibrate", title="Calibration (ACT head search)", order=50)
def calibrate_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("search", ["stage", "layer", "head", "accuracy"]):
        return None
    search = tables.read("search")
    labels = [f"{stage} L{int(layer)}" + ("" if int(head) < 0 else f" h{int(head)}")
              for stage, layer, head in zip(search["stage"], search["layer"], search["head"], strict=True)]
    data = {"trials": {"categories": labels, "series": [{"name": "accuracy on the calibration set",
                                                          "values": floats(search["accuracy"])}]},
            "search": grid(search), "base": None, "summary": None}
    params = tables.manifest.get("parameters", {}) or {}
    if tables.has("summary", ["split", "before", "after"]):
        summary = tables.read("summary")
        calib = summary[summary["split"] == "calibration"]
        if len(calib):
            data["base"] = float(calib["before"].iloc[0])
        data["summary"] = {"categories": [str(s) for s in summary["split"]],
                           "series": [{"name": "before", "values": floats(summary["before"])},
                                      {"name": "after calibration", "values": floats(summary["after"])}],
                           "table": grid(summary)}
    heads = params.get("heads") or {}
    chosen = "; ".join(f"layer {k}: heads {v}" for k, v in heads.items()) or "none (no trial raised accuracy)"
    body = (help_text("ACT (Yu et al. 2024) scales the attention that chosen heads pay to sinks by β = "
                      f"{html.escape(str(params.get('beta', 'β')))}. The search calibrates one layer at a time, then "
                      "one head at a time in the best layers, and keeps what raises accuracy on the calibration set "
                      f"(the dashed line: no calibration). Chosen: {html.escape(chosen)}.")
            + '<div class="ss-chart ss-cal-trials"></div><div class="ss-cal-search"></div>'
            + '<h3>Before and after</h3><div class="ss-view-row"><div class="ss-chart ss-cal-summary"></div>'
              '<div class="ss-cal-table"></div></div>')
    return SectionContent(html=body, data=data, script=script("calibrate"))
