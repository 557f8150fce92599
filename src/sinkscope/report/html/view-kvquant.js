// Section "kvquant": perplexity against bits per keep policy (one chart per cache), the table, the kept positions.
const q = (s) => el.querySelector(s), row = q(".ss-kvq-charts");
for (const c of data.charts) {
  const box = document.createElement("div");
  box.className = "ss-chart";
  row.appendChild(box);
  ss.lineChart(box, c.series, { title: c.title, xlabel: "bits per key and value (16: unquantised)",
    ylabel: "perplexity", width: 460 });
}
ss.table(q(".ss-kvq-table"), data.table);
if (data.kept) ss.table(q(".ss-kvq-kept"), data.kept);
