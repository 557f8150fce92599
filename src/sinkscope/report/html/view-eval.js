// Section "eval": Table 2 per dataset, before/after bars, causal-alignment scatter, example drill-down.
const q = (s) => el.querySelector(s);
const pick = q(".ss-eval-dataset"), detail = q(".ss-eval-detail");
for (const name of Object.keys(data.datasets)) {
  const o = document.createElement("option"); o.value = name; o.textContent = name; pick.appendChild(o);
}
function showDataset() {
  const d = data.datasets[pick.value];
  q(".ss-eval-acc").textContent = "accuracy " + (100 * d.accuracy).toFixed(1) + "% on " + d.n + " examples " +
    "(detect-mask-renormalise re-reads attention after the prediction, so it leaves accuracy unchanged)";
  ss.table(q(".ss-eval-table"), d.table, false, { bars: true });
  ss.barChart(q(".ss-eval-bars"), d.bars.categories, d.bars.series,
    { title: pick.value + ": before and after sink removal", ylabel: "score", width: 560 });
}
pick.addEventListener("change", showDataset);
showDataset();
const P = data.points;
if (P.keys && P.keys.length && data.methods.some((m) => P.after[m])) {
  const methods = data.methods.filter((m) => P.after[m]);
  ss.scatter(q(".ss-eval-scatter"), methods.map((m) => ({ name: "after " + m, x: P.before, y: P.after[m],
    labels: P.keys })), { title: "Causal alignment per example (Spearman ρ)", xlabel: "ρ before",
    ylabel: "ρ after", diagonal: true, onClick: (s, i) => {
      for (const o of el.querySelectorAll(".ss-eval-examples .ss-on")) o.classList.remove("ss-on");
      open(P.keys[i]);
    } });
} else {
  q(".ss-eval-scatter").textContent = "No causal effects in this run (eval --causal), so no alignment scatter.";
}
function strip(title, tokens, w, opts) {
  const h = document.createElement("div"), s = document.createElement("div");
  h.className = "ss-strip-label"; h.textContent = title;
  s.className = "ss-strip ss-eval-strip";
  detail.append(h, s);
  ss.tokenStrip(s, tokens, w, opts);
}
function open(key) {
  const v = data.views[key];
  detail.hidden = false;
  detail.replaceChildren();
  const h = document.createElement("h3");
  h.textContent = "Example " + key;
  detail.appendChild(h);
  if (!v) {
    const p = document.createElement("p");
    p.className = "ss-note";
    p.textContent = "No token view embedded for this example (the page keeps a bounded number per dataset).";
    detail.appendChild(p);
    return;
  }
  const kw = (i) => (v.keyword && v.keyword[i] ? "task keyword" : "");
  strip("attention before (raw a; task keywords in the tooltip)", v.tokens, v.before, { name: "attention", extra: kw });
  for (const [m, a] of Object.entries(v.after)) {
    strip("after detect-mask-renormalise, " + m + " (sinks ▼)", v.tokens, a.w, { sinks: a.sinks, name: "attention",
      extra: kw });
  }
  if (v.causal) {
    strip("causal effect (drop in the predicted label's log-probability without the token; negative shown as 0)",
      v.tokens, v.causal.map((x) => (x === null ? 0 : Math.max(0, x))), { name: "causal effect",
        extra: (i) => "effect " + ss.fmt(v.causal[i]) });
    const box = document.createElement("div");
    box.className = "ss-chart";
    detail.appendChild(box);
    ss.scatter(box, [{ name: "tokens", x: v.before, y: v.causal, labels: v.tokens.map((t, i) => "'" + t + "'@" + i) }],
      { title: "Attention before against causal effect, per token", xlabel: "attention", ylabel: "causal effect" });
  }
  detail.scrollIntoView({ block: "nearest" });
}
const cols = data.examples.columns;
ss.table(q(".ss-eval-examples"), data.examples, undefined, {
  onRow: (r) => open(r[cols.indexOf("dataset")] + "/" + r[cols.indexOf("example_id")]) });
