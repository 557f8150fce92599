// Section "dormant": sink share per domain × head (heat map, the state on hover), switching heads, counts.
const q = (s) => el.querySelector(s), nd = data.domains.length, nh = data.heads.length;
ss.heatMap(q(".ss-dorm-map"), data.values, nd, nh, { rowLabels: data.domains, lo: 0, hi: 1, label: "sink share σ",
  tip: (r, c, v) => data.domains[r] + ", head " + data.heads[c] + ": σ = " + (v === null ? "n/a" : v.toFixed(3)) +
    " (" + data.states[r * nh + c] + ")" });
ss.table(q(".ss-dorm-switch"), data.switch);
ss.table(q(".ss-dorm-counts"), data.counts);
