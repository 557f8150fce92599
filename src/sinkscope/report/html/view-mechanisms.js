// Section "mechanisms": norm heat map → a token's norm over depth → token view at that site; position-0 curve; BOS
// removal; head ablation; massive activations.
const q = (s) => el.querySelector(s);
const N = data.norms;
if (N) {
  const pick = q(".ss-mech-prompt"), panel = q(".ss-mech-cell");
  N.prompts.forEach((p, j) => {
    const o = document.createElement("option"); o.value = j; o.textContent = "prompt " + p.prompt_id + " (" + p.n +
      " tokens)"; pick.appendChild(o);
  });
  function cell(p, r, c) {
    panel.hidden = false;
    panel.replaceChildren();
    const h = document.createElement("h3");
    h.textContent = "Position " + c + " '" + p.tokens[c] + "' at " + p.sites[r];
    const box = document.createElement("div"), lab = document.createElement("div"), s = document.createElement("div");
    box.className = "ss-chart";
    lab.className = "ss-strip-label";
    lab.textContent = "token view: ‖h‖ of every token at " + p.sites[r];
    s.className = "ss-mech-tok";
    panel.append(h, box, lab, s);
    const S = p.sites.length, mine = [], median = [];
    for (let i = 0; i < S; i++) {
      const v = p.values[i * p.n + c];
      mine.push(v === null ? null : Math.pow(10, v));
      const row = [];
      for (let k = 0; k < p.n; k++) if (k !== c && p.values[i * p.n + k] !== null) row.push(p.values[i * p.n + k]);
      row.sort((a, b) => a - b);
      median.push(row.length ? Math.pow(10, row[Math.floor((row.length - 1) / 2)]) : null);
    }
    ss.lineChart(box, [{ name: "‖h‖ of '" + p.tokens[c] + "'@" + c, x: p.depth, y: mine },
      { name: "median ‖h‖ of the other tokens", x: p.depth, y: median }],
    { title: "Norm over depth", xlabel: "depth (layer; .5 = after attention)", ylabel: "‖h‖", ymin: 0, width: 560 });
    const w = [];
    for (let k = 0; k < p.n; k++) { const v = p.values[r * p.n + k]; w.push(v === null ? 0 : Math.pow(10, v)); }
    ss.tokenStrip(s, p.tokens, w, { name: "‖h‖", sinks: w.map((_, k) => k === c) });
  }
  function draw() {
    const p = N.prompts[Number(pick.value) || 0];
    panel.hidden = true;
    ss.heatMap(q(".ss-mech-map"), p.values, p.sites.length, p.n, { rowLabels: p.sites, label: "log₁₀ ‖h‖",
      tip: (r, c, v) => p.sites[r] + ", position " + c + " '" + p.tokens[c] + "'\n‖h‖ " +
        (v === null ? "–" : ss.fmt(Math.pow(10, v))), onClick: (r, c) => cell(p, r, c) });
  }
  pick.addEventListener("change", draw);
  draw();
}
const F = data.profile;
if (F) {
  ss.lineChart(q(".ss-mech-p0"), F.norm, { title: "‖h₀‖ and the median norm", xlabel: "depth", ylabel: "‖h‖",
    ymin: 0, width: 460 });
  ss.lineChart(q(".ss-mech-ratio"), F.ratio, { title: "Norm ratio", xlabel: "depth", ylabel: "ratio", ymin: 0,
    width: 460 });
}
const B = data.bos;
if (B) {
  if (B.alpha0) ss.lineChart(q(".ss-mech-bos-a"), B.alpha0, { title: "α at position 0", xlabel: "layer",
    ylabel: "α₀", ymin: 0, width: 460 });
  if (B.sink_share) ss.lineChart(q(".ss-mech-bos-s"), B.sink_share, { title: "share of heads with a position-0 sink",
    xlabel: "layer", ylabel: "share", ymin: 0, ymax: 1, width: 460 });
  if (data.bos_summary) ss.table(q(".ss-mech-bos-table"), data.bos_summary, undefined, { bars: true });
}
const A = data.ablation;
if (A) {
  ss.barChart(q(".ss-mech-abl"), A.categories, A.series, { title: "Head ablation", ylabel: "change", width: 640 });
  ss.table(q(".ss-mech-abl-table"), A.table, undefined, { bars: true });
}
const M = data.massive;
if (M) {
  ss.barChart(q(".ss-mech-massive"), M.categories, [{ name: "|h| / median |h|", values: M.ratio }],
    { title: "Largest activations", ylabel: "ratio", width: 900 });
  if (M.dims) ss.table(q(".ss-mech-dims"), M.dims);
}
