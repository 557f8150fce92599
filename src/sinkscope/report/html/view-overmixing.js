// Section "overmixing": four per-layer curves, the sink intact and masked in each; the layers table.
const box = el.querySelector(".ss-om-charts");
for (const c of data.charts) {
  const div = document.createElement("div");
  div.className = "ss-chart";
  box.appendChild(div);
  ss.lineChart(div, c.series, { title: c.title, xlabel: "layer", ylabel: c.title, width: 460, height: 280 });
}
ss.table(el.querySelector(".ss-om-table"), data.table);
