// Section "bench-mitigation": the benchmark as a sortable grid with bars; accuracy and cost per method.
ss.table(el.querySelector(".ss-mit-table"), data.table, undefined, { bars: data.bars });
const row = el.querySelector(".ss-mit-charts");
for (const c of data.charts) {
  const box = document.createElement("div");
  box.className = "ss-chart";
  row.appendChild(box);
  ss.barChart(box, c.categories, c.series, { title: c.title, ylabel: c.title.toLowerCase(), width: 520, ymin: 0 });
}
