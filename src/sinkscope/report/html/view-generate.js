// Section "generate": token view shaded by the attention later generated tokens give each key (secondary sinks
// marked), sink mass over the generated positions for one layer, per-layer summary, secondary-sink table.
const q = (s) => el.querySelector(s);
const pickP = q(".ss-gen-prompt"), pickL = q(".ss-gen-layer");
data.prompts.forEach((p, i) => {
  const o = document.createElement("option"); o.value = i; o.textContent = "prompt " + p.prompt_id; pickP.appendChild(o);
});
function strongestLayer(p) {
  let best = p.mass.length - 1, top = -1;
  p.mass.forEach((row, l) => (p.sinks[l] || []).forEach((j) => { if (row[j] > top) { top = row[j]; best = l; } }));
  return best;
}
function fillLayers(p) {
  pickL.replaceChildren();
  p.mass.forEach((_, l) => {
    const o = document.createElement("option"); o.value = l;
    o.textContent = "layer " + l + ((p.sinks[l] || []).length ? " (" + p.sinks[l].length + " secondary)" : "");
    pickL.appendChild(o);
  });
  pickL.value = strongestLayer(p);
}
function draw() {
  const p = data.prompts[Number(pickP.value)], l = Number(pickL.value);
  const w = p.mass[l].map((v) => v === null ? 0 : v), sinks = p.tokens.map(() => false);
  for (const j of p.sinks[l] || []) sinks[j] = true;
  q(".ss-gen-label").textContent = "layer " + l + ": each position shaded by m, the attention the later generated " +
    "tokens give it (mean over them and over heads); ▼ secondary sinks" +
    (p.first_generated === null ? "" : "; generated tokens start at position " + p.first_generated);
  ss.tokenStrip(q(".ss-gen-tokens"), p.tokens, w, { sinks: sinks, name: "m" });
  const series = (p.curves[l] || []).map((s) => ({ name: s.name, x: s.x, y: s.y }));
  ss.lineChart(q(".ss-gen-curves"), series, { title: "Layer " + l + ": attention to position 0 and the secondary " +
    "sinks (mean over heads)" + (p.binned ? ", bin means" : ""), xlabel: "generated position",
    ylabel: "attention", ymin: 0, width: 960, height: 340 });
}
pickP.addEventListener("change", () => { fillLayers(data.prompts[Number(pickP.value)]); draw(); });
pickL.addEventListener("change", draw);
if (data.prompts.length) { fillLayers(data.prompts[0]); draw(); }
if (data.layers) {
  ss.lineChart(q(".ss-gen-layers"), data.layers.series.map((s) => ({ name: s.name, x: data.layers.x, y: s.y })),
    { title: "Per layer, mean over the generated tokens", xlabel: "layer", ylabel: "attention", ymin: 0, width: 460 });
}
if (data.table) ss.table(q(".ss-gen-table"), data.table);
