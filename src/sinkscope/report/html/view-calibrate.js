// Section "calibrate": accuracy per trial of ACT's head search; accuracy before/after per split.
const q = (s) => el.querySelector(s);
const refs = data.base === null ? [] : [{ y: data.base, label: "uncalibrated " + (100 * data.base).toFixed(1) + "%" }];
ss.barChart(q(".ss-cal-trials"), data.trials.categories, data.trials.series,
  { title: "Accuracy per trial", ylabel: "accuracy", ymin: 0, ymax: 1, refs: refs });
ss.table(q(".ss-cal-search"), data.search, undefined, { bars: ["accuracy", "gain"] });
if (data.summary) {
  ss.barChart(q(".ss-cal-summary"), data.summary.categories, data.summary.series,
    { title: "Accuracy before and after", ylabel: "accuracy", ymin: 0, ymax: 1, width: 420 });
  ss.table(q(".ss-cal-table"), data.summary.table);
}
