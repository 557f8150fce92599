"""The report section of a `sinkscope bench-mitigation` run: the benchmark table as a sortable grid with bars, and
accuracy and cost per method."""

from __future__ import annotations

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.views import floats, grid, help_text, script, tables_of
from sinkscope.store import Run

BARRED = ["accuracy", "changed_predictions", "ms_per_example", "cost_vs_none", "mismatch", "match", "spearman",
          "topk_overlap", "sink_share", "null_mass", "loss", "heldout_loss"]


@register_section("bench-mitigation", title="Mitigation benchmark", order=60)
def mitigation_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("mitigation", ["dataset", "method", "accuracy"]):
        return None
    table = tables.read("mitigation")
    methods = list(dict.fromkeys(table["method"]))
    charts = {}
    for column, title in (("accuracy", "Accuracy"), ("cost_vs_none", "Cost (× no mitigation)")):
        if column in table:
            by = table.pivot_table(index="method", columns="dataset", values=column, sort=False).reindex(methods)
            charts[column] = {"title": title, "categories": methods,
                              "series": [{"name": str(d), "values": floats(by[d])} for d in by.columns]}
    data = {"table": grid(table), "bars": [c for c in BARRED if c in table], "charts": list(charts.values())}
    body = (help_text("Accuracy, alignment and cost of each inference-time mitigation on the same examples. Rows of "
                      "kind <code>interpretation</code> (dmr_*) re-read the baseline's attention after the forward "
                      "pass: they change no prediction, so their accuracy is the baseline's. Rows of kind "
                      "<code>training</code> (trained_*) are the tiny LM trained from scratch with that attention "
                      "variant on one budget (<code>--trained-variants</code>). sink_share: attention on position 0 "
                      "(queries after the first), null_mass: on the extra logit, loss: next-token loss on the "
                      "prompts. Click a column header to sort; bars are scaled to each column's largest value.")
            + '<div class="ss-mit-table"></div><div class="ss-view-row ss-mit-charts"></div>')
    return SectionContent(html=body, data=data, script=script("mitigation"))
