// Section "stream": per-token loss of the three caches over position (eviction point marked), perplexity bars.
const pick = el.querySelector(".ss-stream-smooth"), box = el.querySelector(".ss-stream-loss");
function smooth(y, w) {
  if (w <= 1) return y;
  const out = [], q = [];
  let sum = 0;
  for (const v of y) {
    if (v !== null) { q.push(v); sum += v; }
    if (q.length > w) sum -= q.shift();
    out.push(v === null || !q.length ? null : sum / q.length);
  }
  return out;
}
function draw() {
  const w = Number(pick.value);
  const series = data.series.map((s) => ({ name: s.name, x: data.x, y: smooth(s.y, w) }));
  const vlines = data.evict === null ? [] : [{ x: data.evict, label: "eviction starts (" + data.evict + ")" }];
  ss.lineChart(box, series, { title: "Per-token loss by cache" + (w > 1 ? " (running mean over " + w + ")" : "") +
    (data.binned ? ", bin means" : ""), xlabel: "position", ylabel: "loss (nats)", vlines: vlines, width: 960,
    height: 360 });
}
pick.addEventListener("change", draw);
draw();
ss.barChart(el.querySelector(".ss-stream-ppl"), data.ppl.categories, data.ppl.series,
  { title: "Perplexity", ylabel: "perplexity", width: 460 });
ss.table(el.querySelector(".ss-stream-table"), data.table);
