// Section "tags": variance explained per layer × head → a head's sinks → token view; PCA view; taxonomy;
// tag cosines; threshold sensitivity.
const q = (s) => el.querySelector(s);
const G = data.heads, A = data.pca;
if (G) {
  const pick = q(".ss-tags-metric"), panel = q(".ss-tags-head");
  for (const m of G.metrics) {
    const o = document.createElement("option"); o.value = m.name; o.textContent = m.label; pick.appendChild(o);
  }
  function head(l, h) {
    panel.hidden = false;
    panel.replaceChildren();
    const title = document.createElement("h3"), note = document.createElement("p");
    title.textContent = "Layer " + l + ", head " + h;
    note.className = "ss-note";
    const rows = G.sinks[l + "," + h] || [];
    const m = G.metrics.find((x) => x.name === pick.value);
    note.textContent = m.label + ": " + ss.fmt(m.values[l * G.H + h]) + "; " + rows.length +
      " sink(s) over the first prompts" + (rows.length ? ":" : ".");
    panel.append(title, note);
    if (rows.length) {
      const box = document.createElement("div");
      panel.appendChild(box);
      ss.table(box, { columns: ["prompt", "position", "token", "α"], kinds: ["int", "int", "str", "float"],
        rows: rows.map((r) => [r[0], r[1], "'" + r[2] + "'", r[3]]), total: rows.length, note: "" }, false);
    }
    if (A) {
      const w = A.tokens.map(() => 0), sinks = A.tokens.map(() => false);
      for (const r of rows) if (r[0] === A.prompt_id && r[1] < w.length) { w[r[1]] = r[3]; sinks[r[1]] = true; }
      const lab = document.createElement("div"), s = document.createElement("div");
      lab.className = "ss-strip-label";
      lab.textContent = "token view, prompt " + A.prompt_id + ": this head's sinks (▼, shaded by their column mass α)";
      s.className = "ss-tags-tok";
      panel.append(lab, s);
      ss.tokenStrip(s, A.tokens, w, { sinks: sinks, name: "α" });
    }
  }
  let cv = null;
  function draw() {
    const m = G.metrics.find((x) => x.name === pick.value);
    cv = ss.heatMap(q(".ss-tags-grid"), m.values, G.L, G.H, { rowLabels: Array.from({ length: G.L }, (_, i) => "L" + i),
      label: m.label, lo: 0, tip: (l, h, v) => "layer " + l + ", head " + h + "\n" + m.label + ": " + ss.fmt(v) +
        "\nsinks: " + ((G.sinks[l + "," + h] || []).slice(0, 4).map((r) => "'" + r[2] + "'@" + r[1]).join(", ") ||
        "none"), onClick: head });
  }
  pick.addEventListener("change", draw);
  draw();
}
if (A) {
  ss.scatter(q(".ss-tags-pca"), A.series, { title: "head output, layer " + A.layer + " head " + A.head,
    xlabel: "PC 1", ylabel: "PC 2" });
  if (A.series[0].rx) {
    ss.scatter(q(".ss-tags-res"), A.series.map((s) => ({ name: s.name, x: s.rx, y: s.ry, labels: s.labels })),
      { title: "residual stream entering layer " + A.residual_layer, xlabel: "PC 1", ylabel: "PC 2" });
  }
  if (A.attention) ss.tokenStrip(q(".ss-tags-pca-tok"), A.tokens, A.attention, { name: "attention to sink" });
}
const T = data.taxonomy;
if (T) {
  ss.barChart(q(".ss-tags-tax"), T.categories, [{ name: "times a sink", values: T.frequency }],
    { title: "Most frequent sink tokens", ylabel: "count", width: 560 });
  ss.table(q(".ss-tags-tax-table"), T.table, undefined, { bars: true });
}
if (data.cosines) {
  ss.barChart(q(".ss-tags-cos"), data.cosines.categories, data.cosines.series,
    { title: "Tag cosines", xlabel: "cosine", ylabel: "share of pairs", width: 760 });
}
const Z = data.sensitivity;
if (Z) {
  const row = q(".ss-tags-sens");
  for (const c of Z.charts) {
    const box = document.createElement("div");
    box.className = "ss-chart";
    row.appendChild(box);
    ss.lineChart(box, c.series, { title: c.title, xlabel: "ε", ylabel: c.ylabel, width: 420, ymin: 0 });
  }
  ss.table(q(".ss-tags-sens-table"), Z.table, undefined, { bars: Z.table.columns.filter((c) => c !== "eps") });
}
