(function () {
  "use strict";
  const S = window.SINKSCOPE = window.SINKSCOPE || {};
  S.errors = S.errors || [];
  S.timings = {};
  const t0 = performance.now();
  const D = JSON.parse(document.getElementById("ss-data").textContent);
  S.data = D;
  const P = D.palette;
  const $ = (sel) => document.querySelector(sel);

  // ---------------------------------------------------------------- colours, numbers, decoding
  function mix(a, b, t) { return [0, 1, 2].map((i) => Math.round(a[i] + (b[i] - a[i]) * t)); }
  function clamp01(t) { return Number.isFinite(t) ? Math.min(1, Math.max(0, t)) : 0; }
  function heat(t) {  // the heat-map ramp (viridis, palette.VIRIDIS)
    const c = P.heat, x = clamp01(t) * (c.length - 1), i = Math.min(Math.floor(x), c.length - 2);
    return mix(c[i], c[i + 1], x - i);
  }
  function tokenShade(t) { return mix(P.token_low, P.token_high, clamp01(t)); }
  function rgb(c) { return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")"; }
  function ink(c) { return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2] < 128 ? "#fff" : "#000"; }
  function fmt(x, isFloat) {
    if (x === null || x === undefined || (typeof x === "number" && Number.isNaN(x))) return "–";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x) && !isFloat) return String(x);
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toFixed(4);
  }
  function showTok(t) {
    const s = String(t).replace(/\n/g, "\u23CE").replace(/\t/g, "\u21E5");
    return s.length ? s : "\u2205";
  }
  function quote(t) { return "'" + String(t).replace(/\n/g, "\\n") + "'"; }
  let HALF = null;
  function halfTable() {
    if (HALF) return HALF;
    HALF = new Float64Array(65536);
    for (let h = 0; h < 65536; h++) {
      const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      HALF[h] = e === 0 ? s * f * Math.pow(2, -24)
        : e === 31 ? (f ? NaN : s * Infinity) : s * (1 + f / 1024) * Math.pow(2, e - 15);
    }
    return HALF;
  }
  function unpack(p) {
    const bin = atob(p.b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const dv = new DataView(bytes.buffer), n = p.shape.reduce((a, b) => a * b, 1), out = new Float64Array(n);
    if (p.enc === "f32") { for (let i = 0; i < n; i++) out[i] = dv.getFloat32(4 * i, true); }
    else { const T = halfTable(); for (let i = 0; i < n; i++) out[i] = T[dv.getUint16(2 * i, true)]; }
    return out;
  }

  // ---------------------------------------------------------------- tooltip
  const tip = document.getElementById("ss-tip");
  function showTip(text, ev) {
    tip.textContent = text;
    tip.hidden = false;
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + w > window.innerWidth - 4) x = Math.max(4, ev.clientX - w - 14);
    if (y + h > window.innerHeight - 4) y = Math.max(4, ev.clientY - h - 14);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function hideTip() { tip.hidden = true; }
  /** Show a tooltip over `node`: `text` is a string or fn(event) -> string|null (null hides it). */
  function addTip(node, text) {
    node.addEventListener("mousemove", (ev) => {
      const s = typeof text === "function" ? text(ev) : text;
      if (s === null || s === undefined) hideTip(); else showTip(s, ev);
    });
    node.addEventListener("mouseleave", hideTip);
  }

  function legend(el, lo, hi, colourFn, label) {
    const box = document.createElement("div"), cv = document.createElement("canvas");
    box.className = "ss-legend";
    cv.width = 120; cv.height = 10;
    const g = cv.getContext("2d");
    for (let i = 0; i < 120; i++) { g.fillStyle = rgb(colourFn(i / 119)); g.fillRect(i, 0, 1, 10); }
    const a = document.createElement("span"), b = document.createElement("span");
    a.textContent = fmt(lo); b.textContent = fmt(hi) + (label ? "  " + label : "");
    box.append(a, cv, b);
    el.replaceChildren(box);
  }

  // ---------------------------------------------------------------- selections and Algorithm 1
  /** 'all' | '-1' | '0,2,5' | '3-6' (as the CLI) -> sorted distinct indices in [0, size), or throws. */
  function parseSel(spec, size) {
    spec = String(spec).trim();
    if (spec === "" || spec === "all") return Array.from({ length: size }, (_, i) => i);
    const out = new Set();
    for (let part of spec.split(",")) {
      part = part.trim();
      const dash = part.indexOf("-", 1);
      const ends = dash > 0 ? [part.slice(0, dash), part.slice(dash + 1)] : [part, part];
      const lo = Number(ends[0]), hi = Number(ends[1]);
      if (!Number.isInteger(lo) || !Number.isInteger(hi) || ends[0].trim() === "" || ends[1].trim() === "")
        throw new Error("cannot read '" + spec + "': use all, -1, 0,2,5 or 3-6");
      for (let i = lo; i <= hi; i++) {
        if (i < -size || i >= size) throw new Error("index " + i + " is out of range [" + -size + ", " + size + ")");
        out.add(((i % size) + size) % size);
      }
    }
    if (!out.size) throw new Error("empty selection");
    return Array.from(out).sort((a, b) => a - b);
  }
  /** Mean of the selected rows: a_i = mean over (l, h) of A^(l,h)_{n,i} (seed 000 §4.1). */
  function aggregate(view, layers, heads) {
    const n = view.tokens.length, a = new Float64Array(n), v = view.values;
    let count = 0;
    if (view.layout === "head") {
      for (const l of layers) for (const h of heads) {
        const off = (l * S.tokenData.H + h) * n;
        for (let i = 0; i < n; i++) a[i] += v[off + i];
        count++;
      }
    } else {
      for (const l of layers) { const off = l * n; for (let i = 0; i < n; i++) a[i] += v[off + i]; count++; }
    }
    for (let i = 0; i < n; i++) a[i] /= count;
    return a;
  }
  /** ΔH_i = H(a) − H(a without i, renormalised) (natural log; 0 when i holds all the mass), as detect.py's
   * entropy_delta_scores: sums over j ≠ i taken before + after i, never as a total minus a_i. */
  function entropyDelta(a) {
    const n = a.length, xl = new Float64Array(n), out = new Float64Array(n);
    let s = 0, sl = 0;
    for (let i = 0; i < n; i++) { xl[i] = a[i] > 0 ? a[i] * Math.log(a[i]) : 0; s += a[i]; sl += xl[i]; }
    const H = (S, T) => (S > 0 ? Math.log(S) - T / S : 0), all = H(s, sl);
    const before = new Float64Array(n + 1), beforeL = new Float64Array(n + 1);
    for (let i = 0; i < n; i++) { before[i + 1] = before[i] + a[i]; beforeL[i + 1] = beforeL[i] + xl[i]; }
    let after = 0, afterL = 0;
    for (let i = n - 1; i >= 0; i--) {
      out[i] = all - H(before[i] + after, beforeL[i] + afterL);
      after += a[i]; afterL += xl[i];
    }
    return out;
  }
  /** The registry's mask detectors (detect.py) on one vector a: zscore (z_i = (a_i − μ)/σ > α, population σ; none
   * if σ = 0), mean_multiple (a_i > θ·μ), entropy_delta (|ΔH_i| > τ), column_mass (a_i > ε), act (a_i > threshold,
   * the first such key excluded). sink_rate needs the per-head values: see `rateSinks`. */
  function detect(a, method, thr) {
    const n = a.length, sinks = new Array(n).fill(false);
    if (!n) return sinks;
    let sum = 0, hi = -Infinity, lo = Infinity;
    for (let i = 0; i < n; i++) { sum += a[i]; hi = Math.max(hi, a[i]); lo = Math.min(lo, a[i]); }
    const mu = sum / n;
    if (method === "mean_multiple") { for (let i = 0; i < n; i++) sinks[i] = a[i] > thr * mu; return sinks; }
    if (method === "column_mass") { for (let i = 0; i < n; i++) sinks[i] = a[i] > thr; return sinks; }
    if (method === "act") {
      let first = true;
      for (let i = 0; i < n; i++) if (a[i] > thr) { if (first) first = false; else sinks[i] = true; }
      return sinks;
    }
    if (method === "entropy_delta") {
      const d = entropyDelta(a);
      for (let i = 0; i < n; i++) sinks[i] = Math.abs(d[i]) > thr;
      return sinks;
    }
    if (method !== "zscore") throw new Error("detector " + method + " is not available in the page");
    let v = 0;
    for (let i = 0; i < n; i++) v += (a[i] - mu) * (a[i] - mu);
    const sigma = Math.sqrt(v / n);
    if (!(sigma > 0 && hi > lo)) return sinks;
    for (let i = 0; i < n; i++) sinks[i] = (a[i] - mu) / sigma > thr;
    return sinks;
  }
  /** sink_rate (Gu et al.): per key, the share of the chosen (layer, head) rows with a value > ε; a key counts as a
   * sink when that share is at least one half. rows: [Float64Array] of the chosen heads (or layers). */
  function rateSinks(rows, eps) {
    const n = rows.length ? rows[0].length : 0, rate = new Float64Array(n);
    for (const r of rows) for (let i = 0; i < n; i++) if (r[i] > eps) rate[i] += 1 / rows.length;
    return { rate: rate, sinks: Array.from(rate, (x) => x >= 0.5) };
  }
  function headRows(view, layers, heads) {
    const n = view.tokens.length, v = view.values, out = [];
    if (view.layout === "head") {
      for (const l of layers) for (const h of heads) {
        const off = (l * S.tokenData.H + h) * n;
        out.push(v.subarray(off, off + n));
      }
    } else for (const l of layers) out.push(v.subarray(l * n, l * n + n));
    return out;
  }
  /** Algorithm 1: zero the sinks and renormalise (if nothing is left, a renormalised as it is). `given`: a sink mask
   * found elsewhere (sink_rate). */
  function dmr(a, method, thr, given) {
    const sinks = given || detect(a, method, thr), n = a.length, b = new Float64Array(n);
    let kept = 0, all = 0;
    for (let i = 0; i < n; i++) { all += a[i]; if (!sinks[i]) kept += a[i]; }
    for (let i = 0; i < n; i++) {
      if (kept > 0) b[i] = sinks[i] ? 0 : a[i] / kept; else b[i] = all > 0 ? a[i] / all : 0;
    }
    return { b: b, sinks: sinks };
  }

  // ---------------------------------------------------------------- token view
  function strip(el, tokens, w, sinks, other, otherName, name) {
    let peak = 0;
    for (let i = 0; i < w.length; i++) peak = Math.max(peak, w[i]);
    const frag = document.createDocumentFragment();
    for (let i = 0; i < tokens.length; i++) {
      const s = document.createElement("span"), c = tokenShade(peak > 0 ? w[i] / peak : 0);
      s.className = sinks && sinks[i] ? "ss-tok ss-sink" : "ss-tok";
      s.dataset.i = i;
      s.style.background = rgb(c);
      s.style.color = ink(c);
      s.textContent = showTok(tokens[i]);
      frag.appendChild(s);
    }
    el.replaceChildren(frag);
    el._tip = (i) => "position " + i + "  " + quote(tokens[i]) + "\n" + name + ": " + fmt(w[i]) +
      "\n" + otherName + ": " + fmt(other[i]) + (sinks && sinks[i] ? "\nSINK (masked)" : "");
  }
  function topk(el, tokens, a, b, k) {
    const order = (w) => Array.from(w.keys()).sort((x, y) => w[y] - w[x] || x - y).slice(0, k);
    const ra = order(a), rb = order(b);
    const rows = ra.map((i, r) => [r + 1, quote(tokens[i]) + "@" + i, a[i], rb[r] === undefined ? "" :
      quote(tokens[rb[r]]) + "@" + rb[r], rb[r] === undefined ? null : b[rb[r]]]);
    table(el, { columns: ["rank", "before", "a", "after (sink-free)", "b"],
      kinds: ["int", "str", "float", "str", "float"], rows: rows, total: rows.length, note: "" }, false);
  }
  function initTokens() {
    const T = D.tokens;
    const sec = $("#sec-tokens");
    if (!T || !sec) return;
    const notes = $("#ss-tok-notes");
    if (notes) notes.textContent = (T.notes || []).join("; ");
    if (T.mode === "none") return;
    S.tokenData = T;
    for (const p of T.prompts) if (p.rows) p.values = unpack(p.rows);
    const pick = $("#ss-tok-prompt");
    T.prompts.forEach((p, j) => {
      const o = document.createElement("option");
      o.value = j;
      o.textContent = "prompt " + p.prompt_id + " (" + p.tokens.length + " tokens)" +
        (p.text ? ": " + p.text.slice(0, 60) + (p.text.length > 60 ? "…" : "") : "");
      pick.appendChild(o);
    });
    const before = $("#ss-before"), after = $("#ss-after"), msg = $("#ss-tok-msg");
    for (const el of [before, after]) addTip(el, (ev) => {
      const t = ev.target.closest(".ss-tok");
      return t && el._tip ? el._tip(Number(t.dataset.i)) : null;
    });
    const method = $("#ss-tok-method"), thr = $("#ss-tok-thr");
    const dets = {};
    const describe = () => {
      const d = dets[method.value];
      $("#ss-tok-param").textContent = d && d.param ? d.param : "threshold";
      $("#ss-tok-detector").textContent = d ? d.name + ": " + d.description : "";
    };
    if (method) {
      for (const d of T.detectors || []) {
        dets[d.name] = d;
        const o = document.createElement("option");
        o.value = d.name;
        o.textContent = d.name + " (" + d.statistic + ")";
        method.appendChild(o);
      }
      method.value = dets.zscore ? "zscore" : method.options.length ? method.options[0].value : "";
      describe();
      method.addEventListener("change", () => {
        const d = dets[method.value];
        if (d && d.value !== null) thr.value = d.value;
        describe();
        update();
      });
    }
    function update() {
      const t1 = performance.now();
      const view = T.prompts[Number(pick.value) || 0];
      let a, b, sinks;
      msg.textContent = "";
      if (T.mode === "static") {
        a = view.before; b = view.after; sinks = view.sinks;
      } else {
        $("#ss-tok-heads").disabled = view.layout !== "head";
        let layers, heads;
        try {
          layers = parseSel($("#ss-tok-layers").value, T.L);
          heads = view.layout === "head" ? parseSel($("#ss-tok-heads").value, T.H) : [];
        } catch (err) { msg.textContent = String(err.message); return; }
        a = aggregate(view, layers, heads);
        const rated = method.value === "sink_rate" ? rateSinks(headRows(view, layers, heads), Number(thr.value)) : null;
        const r = dmr(a, method.value, Number(thr.value), rated && rated.sinks);
        b = r.b; sinks = r.sinks;
        S.last = { prompt: view.prompt_id, layers: layers, heads: heads, method: method.value,
          threshold: Number(thr.value), a: Array.from(a), b: Array.from(b), sinks: sinks,
          rate: rated ? Array.from(rated.rate) : null };
        const names = sinks.map((s, i) => (s ? quote(view.tokens[i]) + "@" + i + " (" + fmt(a[i]) + ")" : null))
          .filter((s) => s);
        msg.textContent = names.length ? "sinks: " + names.join(", ") : "no sinks at this threshold";
      }
      strip(before, view.tokens, a, sinks, b, "sink-free b", "raw a");
      strip(after, view.tokens, b, sinks, a, "raw a", "sink-free b");
      topk($("#ss-topk"), view.tokens, a, b, 10);
      S.timings.tokens = performance.now() - t1;
    }
    S.updateTokens = update;
    /** Set the token view ({prompt: prompt_id, layers, heads, method, threshold}) and return what it shows. */
    S.setTokenView = function (opts) {
      const j = T.prompts.findIndex((p) => String(p.prompt_id) === String(opts.prompt));
      if (j >= 0) pick.value = String(j);
      if (opts.layers !== undefined) $("#ss-tok-layers").value = String(opts.layers);
      if (opts.heads !== undefined) $("#ss-tok-heads").value = String(opts.heads);
      if (opts.method !== undefined) { method.value = opts.method; describe(); }
      if (opts.threshold !== undefined) thr.value = String(opts.threshold);
      update();
      return S.last;
    };
    for (const id of ["#ss-tok-prompt", "#ss-tok-layers", "#ss-tok-heads", "#ss-tok-thr"]) {
      const el = $(id);
      if (el) el.addEventListener("change", update);
    }
    update();
  }

  // ---------------------------------------------------------------- grid and head panel
  function initGrid() {
    const G = D.grid, box = $("#ss-grid");
    if (!G || !box) return;
    const L = G.L, H = G.H, cs = Math.max(5, Math.min(36, Math.floor(640 / H)));
    const ch = Math.max(6, Math.min(cs, Math.floor(560 / L)));
    box.style.gridTemplateColumns = "3.2em repeat(" + H + ", " + cs + "px)";
    box.style.gridAutoRows = ch + "px";
    const every = cs >= 14 ? 1 : Math.ceil(14 / cs);
    const frag = document.createDocumentFragment();
    frag.appendChild(document.createElement("span"));
    for (let h = 0; h < H; h++) {
      const s = document.createElement("span");
      s.className = "ss-hlabel";
      s.textContent = h % every === 0 ? String(h) : "";
      frag.appendChild(s);
    }
    const cells = [];
    for (let l = 0; l < L; l++) {
      const lab = document.createElement("span");
      lab.className = "ss-glabel";
      lab.textContent = l % Math.max(1, Math.ceil(11 / ch)) === 0 ? "L" + l : "";
      frag.appendChild(lab);
      for (let h = 0; h < H; h++) {
        const c = document.createElement("div");
        c.className = "ss-cell";
        c.dataset.l = l; c.dataset.h = h;
        cells.push(c);
        frag.appendChild(c);
      }
    }
    box.appendChild(frag);
    const metric = $("#ss-grid-metric"), which = $("#ss-grid-prompt");
    for (const m of G.metrics) {
      const o = document.createElement("option"); o.value = m.name; o.textContent = m.label; metric.appendChild(o);
    }
    G.views.forEach((v, j) => {
      const o = document.createElement("option"); o.value = j; o.textContent = v.label; which.appendChild(o);
    });
    let hi = 1;
    function colour() {
      const v = G.views[Number(which.value) || 0].values[metric.value];
      hi = 0;
      for (const x of v) if (x !== null && x > hi) hi = x;
      if (hi <= 0) hi = 1;
      for (let i = 0; i < cells.length; i++) {
        cells[i].style.background = v[i] === null ? "#eee" : rgb(heat(v[i] / hi));
      }
      const m = G.metrics.find((x) => x.name === metric.value);
      legend($("#ss-grid-legend"), 0, hi, heat, "");
      const scale = $("#ss-grid-scale");
      if (scale) scale.textContent = "Colour: " + m.label + ", from 0 (dark purple) to " + fmt(hi) +
        " (yellow), the largest value in this grid; grey: no value. " + (m.note || "");
      S.gridScale = { metric: m.name, lo: 0, hi: hi, text: scale ? scale.textContent : "" };
    }
    metric.addEventListener("change", colour);
    which.addEventListener("change", colour);
    colour();
    addTip(box, (ev) => {
      const c = ev.target.closest(".ss-cell");
      if (!c) return null;
      const l = Number(c.dataset.l), h = Number(c.dataset.h), i = l * H + h, view = G.views[Number(which.value) || 0];
      const label = G.metrics.find((m) => m.name === metric.value).label;
      return "layer " + l + ", head " + h + " (" + view.label + ")\n" + label + ": " +
        fmt(view.values[metric.value][i]) + "\nsinks: " + (view.sinks[i] || "none");
    });
    box.addEventListener("click", (ev) => {
      const c = ev.target.closest(".ss-cell");
      if (!c) return;
      for (const x of box.querySelectorAll(".ss-on")) x.classList.remove("ss-on");
      c.classList.add("ss-on");
      headPanel(Number(c.dataset.l), Number(c.dataset.h), G.views[Number(which.value) || 0].prompt_id);
    });
    S.cells = cells;
  }

  function headPanel(l, h, promptId) {
    const panel = $("#ss-head");
    if (!panel) return;
    panel.classList.add("ss-open");
    panel.replaceChildren();
    const title = document.createElement("h3");
    title.textContent = "Layer " + l + ", head " + h;
    panel.appendChild(title);
    const M = D.maps && D.maps.prompts;
    let pid = promptId;
    if (M && (pid === null || pid === undefined || !M[pid])) pid = Object.keys(M)[0];
    const m = M && M[pid], key = l + "," + h;
    const note = document.createElement("p");
    note.className = "ss-note";
    panel.appendChild(note);
    if (m && m.heads[key]) {
      note.textContent = "Attention map, prompt " + pid + " (" + m.n + " tokens); rows are queries, columns keys; " +
        "colour scaled to this map's maximum.";
      drawMap(panel, unpack(m.heads[key]), m.n, m.tokens);
    } else {
      const T = S.tokenData;
      const view = T && T.mode === "interactive" && T.prompts.find((p) => p.layout === "head" &&
        (pid === null || pid === undefined || String(p.prompt_id) === String(pid)));
      if (view) {
        const n = view.tokens.length, off = (l * T.H + h) * n, w = view.values.slice(off, off + n);
        note.textContent = (m ? "No map embedded for this head (size budget). " :
          "No attention maps in this run (they are kept for prompts of ≤ 64 tokens). ") +
          "The " + (T.stat === "last_row" ? "last token's attention row" : "column mass α") +
          ", prompt " + view.prompt_id + ":";
        drawBars(panel, w, view.tokens);
      } else {
        note.textContent = "No per-head data embedded for this head.";
      }
    }
    if (S.setTokenView && S.tokenData && S.tokenData.mode === "interactive") {
      const btn = document.createElement("button");
      btn.textContent = "Show this head in the token view";
      btn.addEventListener("click", () => {
        S.setTokenView({ layers: String(l), heads: String(h), prompt: promptId });
        $("#sec-tokens").scrollIntoView();
      });
      title.after(btn);  // above the map, which can be taller than the window
    }
  }
  /** An n × n attention map (rows: queries, columns: keys) with token labels on both axes while they fit, a linear or
   * square-root colour scale, and zoom (cell size) for long prompts; the canvas scrolls inside its box. */
  function drawMap(panel, w, n, tokens) {
    const cv = document.createElement("canvas"), g = cv.getContext("2d"), lg = document.createElement("div");
    const bar = document.createElement("div"), box = document.createElement("div"), scale = document.createElement("select");
    bar.className = "ss-controls";
    box.className = "ss-map-box";
    cv.className = "ss-map";
    for (const [v, t] of [["linear", "linear colour scale"], ["sqrt", "square-root colour scale"]]) {
      const o = document.createElement("option"); o.value = v; o.textContent = t; scale.appendChild(o);
    }
    let cell = Math.max(6, Math.min(32, Math.floor(640 / n)));
    const zoom = (f) => { cell = Math.max(2, Math.min(48, Math.round(cell * f))); paint(); };
    const zin = document.createElement("button"), zout = document.createElement("button");
    zin.textContent = "zoom in"; zout.textContent = "zoom out";
    zin.className = "ss-zoom-in"; zout.className = "ss-zoom-out";
    zin.addEventListener("click", () => zoom(1.5));
    zout.addEventListener("click", () => zoom(1 / 1.5));
    bar.append(scale, zout, zin);
    let hi = 0;
    for (const x of w) hi = Math.max(hi, x);
    const label = (i) => {  // the token (spaces shown as ␣, cut at 14 characters) and its position
      const t = showTok(tokens[i]).replace(/ /g, "\u2423");
      return (t.length > 14 ? t.slice(0, 13) + "…" : t) + " " + i;
    };
    let pad = 0, every = 1;
    function paint() {
      const font = Math.max(9, Math.min(13, cell - 2));
      every = Math.ceil((font + 2) / cell);
      g.font = font + "px ui-monospace, monospace";
      pad = 8;
      for (let i = 0; i < n; i += every) pad = Math.max(pad, g.measureText(label(i)).width + 8);
      cv.width = pad + n * cell; cv.height = pad + n * cell;
      g.font = font + "px ui-monospace, monospace";
      const f = scale.value === "sqrt" ? Math.sqrt : (x) => x;
      for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
        g.fillStyle = rgb(heat(hi > 0 ? f(w[q * n + k] / hi) : 0));
        g.fillRect(pad + k * cell, pad + q * cell, cell, cell);
      }
      g.fillStyle = "#333";
      g.textAlign = "right"; g.textBaseline = "middle";
      for (let q = 0; q < n; q += every) g.fillText(label(q), pad - 4, pad + q * cell + cell / 2);
      for (let k = 0; k < n; k += every) {
        g.save();
        g.translate(pad + k * cell + cell / 2, pad - 4);
        g.rotate(-Math.PI / 2);
        g.textAlign = "left";
        g.fillText(label(k), 0, 0);
        g.restore();
      }
      cv.dataset.cell = cell; cv.dataset.pad = pad; cv.dataset.every = every;
      legend(lg, 0, hi, (t) => heat(f(t)), "attention weight (each query's row sums to 1; colour up to this map's " +
        "largest weight, " + fmt(hi) + ")");
    }
    scale.addEventListener("change", paint);
    box.appendChild(cv);
    panel.append(bar, box, lg);
    paint();
    addTip(cv, (ev) => {
      const r = cv.getBoundingClientRect(), k = Math.floor((ev.clientX - r.left - pad) / cell);
      const q = Math.floor((ev.clientY - r.top - pad) / cell);
      if (q < 0 || k < 0 || q >= n || k >= n) return null;
      return "query " + q + " " + quote(tokens[q]) + " → key " + k + " " + quote(tokens[k]) + ": " + fmt(w[q * n + k]);
    });
    /** What the map shows, for tests: its size, cell, and the labels drawn on each axis. */
    S.mapShown = () => ({ n: n, cell: cell, every: every, labels: Array.from({ length: Math.ceil(n / every) },
      (_, j) => label(j * every)), width: cv.width, height: cv.height });
  }
  function drawBars(panel, w, tokens) {
    const n = w.length, bw = Math.min(14, 900 / n), height = 120;
    const cv = document.createElement("canvas");
    cv.width = Math.ceil(n * bw); cv.height = height;
    const g = cv.getContext("2d");
    let hi = 0;
    for (const x of w) hi = Math.max(hi, x);
    g.fillStyle = rgb(P.token_high);
    for (let i = 0; i < n; i++) {
      const y = hi > 0 ? (w[i] / hi) * (height - 4) : 0;
      g.fillRect(i * bw, height - y, Math.max(1, bw - (bw > 3 ? 1 : 0)), Math.max(y, 0.5));
    }
    panel.appendChild(cv);
    addTip(cv, (ev) => {
      const i = Math.floor((ev.clientX - cv.getBoundingClientRect().left) / bw);
      return i >= 0 && i < n ? "position " + i + " " + quote(tokens[i]) + ": " + fmt(w[i]) : null;
    });
  }

  // ---------------------------------------------------------------- line charts (SVG)
  const NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function ticks(lo, hi, n) {
    const span = hi - lo || 1, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) {
      out.push(Math.abs(v) < step * 1e-6 ? 0 : Number(v.toPrecision(12)));
    }
    return out;
  }
  function marker(kind, x, y, colour, g) {
    const r = 3.5;
    if (kind === 1) return svg("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, fill: colour }, g);
    if (kind === 2) return svg("path", { d: "M" + x + "," + (y - r - 1) + "l" + (r + 1) + "," + (2 * r + 1) + "h" +
      (-2 * r - 2) + "z", fill: colour }, g);
    if (kind === 3) return svg("path", { d: "M" + x + "," + (y - r - 1) + "l" + (r + 1) + "," + (r + 1) + "l" +
      (-r - 1) + "," + (r + 1) + "l" + (-r - 1) + "," + (-r - 1) + "z", fill: colour }, g);
    return svg("circle", { cx: x, cy: y, r: r, fill: kind === 0 ? colour : "#fff", stroke: colour }, g);
  }
  /** series: [{name, x: [], y: []}]; opts: {title, xlabel, ylabel, ymin, ymax, width, height, markers (default:
   * only up to 300 points), vlines: [{x, label}] (dashed vertical reference lines)}. */
  function lineChart(el, series, opts) {
    opts = opts || {};
    const W = opts.width || 520, Hh = opts.height || 300;
    const m = { l: 52, r: 14, t: 30 + 16 * series.length, b: 40 };
    const xs = [], ys = [];
    for (const s of series) s.x.forEach((x, i) => { if (s.y[i] !== null) { xs.push(x); ys.push(s.y[i]); } });
    if (!xs.length) { el.textContent = "no data"; return; }
    let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = opts.ymin !== undefined ? opts.ymin : Math.min(...ys);
    let y1 = opts.ymax !== undefined ? opts.ymax : Math.max(...ys);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 <= y0) y1 = y0 + 1;
    y1 += (y1 - y0) * 0.05;
    const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
    const Y = (y) => Hh - m.b - ((y - y0) / (y1 - y0)) * (Hh - m.t - m.b);
    const root = svg("svg", { width: W, height: Hh, viewBox: "0 0 " + W + " " + Hh, role: "img" });
    svg("text", { x: m.l, y: 16, "font-weight": 600 }, root).textContent = opts.title || "";
    for (const v of ticks(y0, y1, 5)) {
      svg("line", { x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), stroke: "#e6e6e6" }, root);
      const label = svg("text", { x: m.l - 6, y: Y(v) + 4, "text-anchor": "end" }, root);
      label.textContent = String(Number(v.toPrecision(4)));
    }
    const intX = xs.every((x) => Number.isInteger(x));
    for (const v of ticks(x0, x1, 8).filter((t) => !intX || Number.isInteger(t))) {
      svg("text", { x: X(v), y: Hh - m.b + 16, "text-anchor": "middle" }, root).textContent = String(v);
    }
    svg("line", { x1: m.l, x2: W - m.r, y1: Hh - m.b, y2: Hh - m.b, stroke: "#444" }, root);
    svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: Hh - m.b, stroke: "#444" }, root);
    svg("text", { x: (W + m.l) / 2, y: Hh - 6, "text-anchor": "middle" }, root).textContent = opts.xlabel || "";
    svg("text", { x: 12, y: (Hh - m.b + m.t) / 2, "text-anchor": "middle",
      transform: "rotate(-90 12 " + (Hh - m.b + m.t) / 2 + ")" }, root).textContent = opts.ylabel || "";
    for (const v of opts.vlines || []) {
      if (!(v.x >= x0 && v.x <= x1)) continue;
      svg("line", { x1: X(v.x), x2: X(v.x), y1: m.t, y2: Hh - m.b, stroke: "#D55E00", "stroke-dasharray": "4 3",
        class: "ss-vline" }, root);
      svg("text", { x: X(v.x) + 4, y: m.t + 12, fill: "#D55E00" }, root).textContent = v.label || "";
    }
    const markers = opts.markers !== undefined ? opts.markers : xs.length <= 300;
    series.forEach((s, j) => {
      const colour = P.lines[j % P.lines.length], g = svg("g", {}, root);
      const pts = s.x.map((x, i) => [x, s.y[i]]).filter((p) => p[1] !== null);
      svg("path", { d: pts.map((p, i) => (i ? "L" : "M") + X(p[0]) + "," + Y(p[1])).join(""), fill: "none",
        stroke: colour, "stroke-width": markers ? 2 : 1.2, "stroke-dasharray": P.dashes[j % P.dashes.length] }, g);
      if (markers) for (const p of pts) {
        const mk = marker(j % 5, X(p[0]), Y(p[1]), colour, g);
        mk.dataset.tip = s.name + "\n" + (opts.xlabel || "x") + " " + p[0] + ": " + fmt(p[1]);
      }
      const ly = 30 + j * 16, lx = m.l + 4;
      svg("line", { x1: lx, x2: lx + 24, y1: ly, y2: ly, stroke: colour, "stroke-width": 2,
        "stroke-dasharray": P.dashes[j % P.dashes.length] }, root);
      marker(j % 5, lx + 12, ly, colour, root);
      svg("text", { x: lx + 30, y: ly + 4 }, root).textContent = s.name;
    });
    addTip(root, (ev) => (ev.target.dataset && ev.target.dataset.tip) || null);
    el.replaceChildren(root);
    return root;
  }
  function initCurves() {
    const C = D.curves, box = $("#ss-curves");
    if (!C || !box) return;
    for (const c of C.charts) {
      const div = document.createElement("div");
      div.className = "ss-chart";
      div.id = "ss-chart-" + c.id;
      box.appendChild(div);
      lineChart(div, c.series, c);
    }
  }

  function axes(root, W, Hh, m, X, Y, x0, x1, y0, y1, opts, xTicks) {
    svg("text", { x: m.l, y: 16, "font-weight": 600 }, root).textContent = opts.title || "";
    for (const v of ticks(y0, y1, 5)) {
      svg("line", { x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), stroke: "#e6e6e6" }, root);
      svg("text", { x: m.l - 6, y: Y(v) + 4, "text-anchor": "end" }, root).textContent = String(Number(v.toPrecision(4)));
    }
    if (xTicks) for (const v of ticks(x0, x1, 8)) {
      svg("text", { x: X(v), y: Hh - m.b + 16, "text-anchor": "middle" }, root).textContent =
        String(Number(v.toPrecision(4)));
    }
    svg("line", { x1: m.l, x2: W - m.r, y1: Hh - m.b, y2: Hh - m.b, stroke: "#444" }, root);
    svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: Hh - m.b, stroke: "#444" }, root);
    svg("text", { x: (W + m.l) / 2, y: Hh - 6, "text-anchor": "middle" }, root).textContent = opts.xlabel || "";
    svg("text", { x: 12, y: (Hh - m.b + m.t) / 2, "text-anchor": "middle",
      transform: "rotate(-90 12 " + (Hh - m.b + m.t) / 2 + ")" }, root).textContent = opts.ylabel || "";
  }
  function seriesLegend(root, series, m, swatch) {
    series.forEach((s, j) => {
      const ly = 30 + j * 16, lx = m.l + 4;
      swatch(j, lx, ly);
      svg("text", { x: lx + 30, y: ly + 4 }, root).textContent = s.name;
    });
  }
  /** Grouped bars. categories: [label]; series: [{name, values: [number|null]}] (one bar per category each);
   * opts: {title, xlabel, ylabel, ymin, ymax, width, height, refs: [{y, label}] (dashed horizontal lines)}. */
  function barChart(el, categories, series, opts) {
    opts = opts || {};
    const W = opts.width || Math.max(320, Math.min(1100, 90 + categories.length * (18 * series.length + 18)));
    const longest = Math.max(...categories.map((c) => Math.min(22, String(c).length)));
    const band0 = (W - 66) / categories.length, turn = longest * 6.5 > band0;
    const Hh = (opts.height || 300) + (turn ? longest * 4.5 : 0);
    const m = { l: turn ? Math.max(52, longest * 4) : 52, r: 14, t: 30 + 16 * series.length, b: turn ? 30 + longest * 5 : 56 };
    const vals = [];
    for (const s of series) for (const v of s.values) if (Number.isFinite(v)) vals.push(v);
    for (const r of opts.refs || []) vals.push(r.y);
    if (!vals.length) { el.textContent = "no data"; return null; }
    let y0 = opts.ymin !== undefined ? opts.ymin : Math.min(0, ...vals);
    let y1 = opts.ymax !== undefined ? opts.ymax : Math.max(0, ...vals);
    if (y1 <= y0) y1 = y0 + 1;
    if (opts.ymax === undefined) y1 += (y1 - y0) * 0.05;
    const band = (W - m.l - m.r) / categories.length, bw = Math.min(28, (band * 0.8) / series.length);
    const Y = (y) => Hh - m.b - ((y - y0) / (y1 - y0)) * (Hh - m.t - m.b);
    const root = svg("svg", { width: W, height: Hh, viewBox: "0 0 " + W + " " + Hh, role: "img",
      class: "ss-bars" });
    axes(root, W, Hh, m, null, Y, 0, 0, y0, y1, opts, false);
    const every = Math.ceil(categories.length / Math.max(1, Math.floor((W - m.l - m.r) / (turn ? 13 : 40))));
    categories.forEach((c, i) => {
      const cx = m.l + band * (i + 0.5);
      if (i % every === 0) {
        const t = svg("text", turn ? { x: cx, y: Hh - m.b + 12, "text-anchor": "end",
          transform: "rotate(-40 " + cx + " " + (Hh - m.b + 12) + ")" }
          : { x: cx, y: Hh - m.b + 14, "text-anchor": "middle" }, root);
        t.textContent = String(c).length > 22 ? String(c).slice(0, 21) + "…" : String(c);
      }
      series.forEach((s, j) => {
        const v = s.values[i];
        if (!Number.isFinite(v)) return;
        const x = cx - (bw * series.length) / 2 + j * bw, base = Y(Math.min(Math.max(0, y0), y1));
        const top = Y(Math.min(Math.max(v, y0), y1));
        const r = svg("rect", { x: x, y: Math.min(top, base), width: Math.max(1, bw - 1),
          height: Math.max(Math.abs(base - top), 0.5), fill: P.lines[j % P.lines.length], class: "ss-bar-rect" },
          root);
        r.dataset.tip = c + "\n" + s.name + ": " + fmt(v);
      });
    });
    for (const ref of opts.refs || []) {
      svg("line", { x1: m.l, x2: W - m.r, y1: Y(ref.y), y2: Y(ref.y), stroke: "#000", "stroke-dasharray": "5 3" },
        root);
      svg("text", { x: W - m.r - 4, y: Y(ref.y) - 4, "text-anchor": "end" }, root).textContent = ref.label || "";
    }
    seriesLegend(root, series, m, (j, lx, ly) => svg("rect", { x: lx, y: ly - 5, width: 24, height: 10,
      fill: P.lines[j % P.lines.length] }, root));
    addTip(root, (ev) => (ev.target.dataset && ev.target.dataset.tip) || null);
    el.replaceChildren(root);
    return root;
  }
  /** Points. series: [{name, x: [], y: [], labels: [] (tooltips), colour: [t ∈ 0..1] (optional, the heat ramp)}];
   * opts: {title, xlabel, ylabel, width, height, diagonal (y = x line), onClick: fn(series index, point index)}. */
  function scatter(el, series, opts) {
    opts = opts || {};
    const W = opts.width || 480, Hh = opts.height || 360, m = { l: 52, r: 14, t: 30 + 16 * series.length, b: 40 };
    const xs = [], ys = [];
    for (const s of series) s.x.forEach((x, i) => {
      if (Number.isFinite(x) && Number.isFinite(s.y[i])) { xs.push(x); ys.push(s.y[i]); }
    });
    if (!xs.length) { el.textContent = "no data"; return null; }
    let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (opts.diagonal) { x0 = y0 = Math.min(x0, y0); x1 = y1 = Math.max(x1, y1); }
    const px = (x1 - x0) * 0.05 || 1, py = (y1 - y0) * 0.05 || 1;
    x0 -= px; x1 += px; y0 -= py; y1 += py;
    const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
    const Y = (y) => Hh - m.b - ((y - y0) / (y1 - y0)) * (Hh - m.t - m.b);
    const root = svg("svg", { width: W, height: Hh, viewBox: "0 0 " + W + " " + Hh, role: "img",
      class: "ss-scatter" });
    axes(root, W, Hh, m, X, Y, x0, x1, y0, y1, opts, true);
    if (opts.diagonal) {
      svg("line", { x1: X(x0), y1: Y(x0), x2: X(x1), y2: Y(x1), stroke: "#999", "stroke-dasharray": "4 3" }, root);
    }
    series.forEach((s, j) => {
      const base = P.lines[j % P.lines.length], g = svg("g", {}, root);
      s.x.forEach((x, i) => {
        const y = s.y[i];
        if (!Number.isFinite(x) || !Number.isFinite(y)) return;
        const colour = s.colour ? rgb(heat(s.colour[i])) : base;
        const mk = marker(j % 5, X(x), Y(y), colour, g);
        mk.setAttribute("class", "ss-point");
        mk.dataset.s = j; mk.dataset.i = i;
        mk.dataset.tip = (s.labels ? s.labels[i] + "\n" : s.name + "\n") + (opts.xlabel || "x") + ": " + fmt(x) +
          "\n" + (opts.ylabel || "y") + ": " + fmt(y);
        if (opts.onClick) mk.style.cursor = "pointer";
      });
    });
    seriesLegend(root, series, m, (j, lx, ly) => marker(j % 5, lx + 12, ly, P.lines[j % P.lines.length], root));
    addTip(root, (ev) => (ev.target.dataset && ev.target.dataset.tip) || null);
    if (opts.onClick) root.addEventListener("click", (ev) => {
      const t = ev.target.closest(".ss-point");
      if (t) opts.onClick(Number(t.dataset.s), Number(t.dataset.i));
    });
    el.replaceChildren(root);
    return root;
  }
  /** A canvas heat map (viridis) of values [rows × cols, row-major; null = no value]. opts: {rowLabels, colLabels,
   * cell (px), lo, hi, label (legend), tip: fn(r, c, v) -> text, onClick: fn(r, c)}. The chosen cell is outlined;
   * returns the canvas (its `select(r, c)` picks a cell as a click does). */
  function heatMap(el, values, rows, cols, opts) {
    opts = opts || {};
    const cw = opts.cell || Math.max(2, Math.min(36, Math.floor(900 / cols)));
    const ch = opts.cell || Math.max(4, Math.min(36, Math.floor(420 / rows)));
    const longest = Math.max(1, ...(opts.rowLabels || [String(rows)]).map((x) => String(x).length));
    const labW = 10 + 6 * longest, labH = 16, cv = document.createElement("canvas");
    cv.width = labW + cols * cw; cv.height = labH + rows * ch;
    cv.className = "ss-heat";
    const g = cv.getContext("2d");
    let lo = opts.lo, hi = opts.hi;
    if (lo === undefined || hi === undefined) {
      let a = Infinity, b = -Infinity;
      for (const v of values) if (Number.isFinite(v)) { a = Math.min(a, v); b = Math.max(b, v); }
      if (lo === undefined) lo = Number.isFinite(a) ? a : 0;
      if (hi === undefined) hi = Number.isFinite(b) ? b : 1;
    }
    if (hi <= lo) hi = lo + 1;
    let chosen = null;
    function paint() {
      g.clearRect(0, 0, cv.width, cv.height);
      g.font = "10px system-ui, sans-serif";
      g.fillStyle = "#5b5b5b";
      g.textAlign = "right"; g.textBaseline = "middle";
      const rEvery = Math.ceil(11 / ch), cEvery = Math.ceil(22 / cw);
      for (let r = 0; r < rows; r += rEvery) {
        g.fillText(opts.rowLabels ? String(opts.rowLabels[r]) : String(r), labW - 4, labH + r * ch + ch / 2);
      }
      g.textAlign = "center"; g.textBaseline = "alphabetic";
      for (let c = 0; c < cols; c += cEvery) {
        g.fillText(opts.colLabels ? String(opts.colLabels[c]) : String(c), labW + c * cw + cw / 2, labH - 4);
      }
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
        const v = values[r * cols + c];
        g.fillStyle = Number.isFinite(v) ? rgb(heat((v - lo) / (hi - lo))) : "#eee";
        g.fillRect(labW + c * cw, labH + r * ch, cw - (cw > 4 ? 1 : 0), ch - (ch > 4 ? 1 : 0));
      }
      if (chosen) {
        g.strokeStyle = "#D55E00"; g.lineWidth = 2;
        g.strokeRect(labW + chosen[1] * cw + 1, labH + chosen[0] * ch + 1, Math.max(cw - 2, 2), Math.max(ch - 2, 2));
      }
    }
    function at(ev) {
      const b = cv.getBoundingClientRect();
      const c = Math.floor((ev.clientX - b.left - labW) / cw), r = Math.floor((ev.clientY - b.top - labH) / ch);
      return r >= 0 && c >= 0 && r < rows && c < cols ? [r, c] : null;
    }
    paint();
    addTip(cv, (ev) => {
      const p = at(ev);
      if (!p) return null;
      const v = values[p[0] * cols + p[1]];
      return opts.tip ? opts.tip(p[0], p[1], v) : "row " + p[0] + ", column " + p[1] + ": " + fmt(v);
    });
    cv.select = (r, c) => { chosen = [r, c]; paint(); if (opts.onClick) opts.onClick(r, c); };
    cv.addEventListener("click", (ev) => { const p = at(ev); if (p) cv.select(p[0], p[1]); });
    cv.cellCentre = (r, c) => [labW + c * cw + cw / 2, labH + r * ch + ch / 2];
    const wrap = document.createElement("div"), lg = document.createElement("div");
    wrap.className = "ss-heat-wrap";
    wrap.appendChild(cv);
    legend(lg, lo, hi, heat, opts.label || "");
    el.replaceChildren(wrap, lg);
    return cv;
  }
  /** Tokens shaded by weights w (white → dark blue, scaled to the largest). opts: {sinks: [bool], name (of w),
   * extra: fn(i) -> text for the tooltip}. */
  function tokenStrip(el, tokens, w, opts) {
    opts = opts || {};
    el.classList.add("ss-strip");
    strip(el, tokens, w, opts.sinks || null, w, opts.name || "weight", opts.name || "weight");
    const name = opts.name || "weight";
    el._tip = (i) => "position " + i + "  " + quote(tokens[i]) + "\n" + name + ": " + fmt(w[i]) +
      (opts.extra ? "\n" + opts.extra(i) : "") + (opts.sinks && opts.sinks[i] ? "\nSINK" : "");
    if (!el._tipped) {
      el._tipped = true;
      addTip(el, (ev) => {
        const t = ev.target.closest(".ss-tok");
        return t && el._tip ? el._tip(Number(t.dataset.i)) : null;
      });
    }
  }

  // ---------------------------------------------------------------- sortable tables
  /** A sortable table of `tj` (encode.table_json). opts: {bars: true or [column names] (those float columns get a bar
   * in each cell, scaled to the column's largest |value|), onRow: fn(row values, tr) (rows become clickable)}. */
  function table(el, tj, caption, opts) {
    opts = opts || {};
    const wrap = document.createElement("div"), t = document.createElement("table");
    wrap.className = "ss-tblwrap";
    t.className = "ss-tbl";
    if (caption !== false && tj.note) {
      const c = document.createElement("caption");
      c.textContent = tj.note;
      t.appendChild(c);
    }
    const thead = document.createElement("thead"), tr = document.createElement("tr");
    const tbody = document.createElement("tbody");
    let rows = tj.rows.slice(), col = -1, dir = 1;
    const num = (k) => k === "int" || k === "float";
    const barred = (j) => (Array.isArray(opts.bars) ? opts.bars.includes(tj.columns[j]) : opts.bars);
    const peak = tj.columns.map((_, j) => (barred(j) && tj.kinds[j] === "float"
      ? Math.max(0, ...tj.rows.map((r) => (Number.isFinite(r[j]) ? Math.abs(r[j]) : 0))) : 0));
    function body() {
      const frag = document.createDocumentFragment();
      for (const r of rows) {
        const row = document.createElement("tr");
        r.forEach((v, j) => {
          const td = document.createElement("td");
          td.textContent = tj.kinds[j] === "str" && v !== null ? String(v) : fmt(v, tj.kinds[j] === "float");
          if (num(tj.kinds[j])) td.className = "ss-num";
          if (peak[j] > 0 && Number.isFinite(v)) {
            const w = (100 * Math.abs(v)) / peak[j], c = v < 0 ? "rgba(213,94,0,.28)" : "rgba(0,114,178,.22)";
            td.style.background = "linear-gradient(to left, " + c + " " + w + "%, transparent " + w + "%)";
          }
          row.appendChild(td);
        });
        if (opts.onRow) {
          row.className = "ss-pick";
          row.tabIndex = 0;
          row.addEventListener("click", () => {
            for (const o of tbody.querySelectorAll(".ss-on")) o.classList.remove("ss-on");
            row.classList.add("ss-on");
            opts.onRow(r, row);
          });
        }
        frag.appendChild(row);
      }
      tbody.replaceChildren(frag);
    }
    tj.columns.forEach((name, j) => {
      const th = document.createElement("th"), b = document.createElement("button");
      if (num(tj.kinds[j])) th.className = "ss-num";
      b.textContent = name;
      b.title = "sort by " + name;
      b.addEventListener("click", () => {
        dir = col === j ? -dir : 1;
        col = j;
        const cmp = num(tj.kinds[j]) || tj.kinds[j] === "bool"
          ? (x, y) => (x[j] === null) - (y[j] === null) || dir * (x[j] - y[j])
          : (x, y) => dir * String(x[j]).localeCompare(String(y[j]));
        rows.sort(cmp);
        for (const o of tr.querySelectorAll("button")) o.textContent = o.textContent.replace(/ [▲▼]$/, "");
        b.textContent = name + (dir > 0 ? " ▲" : " ▼");
        th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
        body();
      });
      th.appendChild(b);
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    t.append(thead, tbody);
    body();
    wrap.appendChild(t);
    el.replaceChildren(wrap);
    return t;
  }
  function initTables() {
    for (const el of document.querySelectorAll(".ss-table[data-src]")) {
      const src = document.getElementById(el.dataset.src);
      if (src) table(el, JSON.parse(src.textContent));
    }
  }

  // ---------------------------------------------------------------- start
  S.tip = addTip; S.lineChart = lineChart; S.table = table; S.colour = (t) => rgb(heat(t));
  S.barChart = barChart; S.scatter = scatter; S.heatMap = heatMap; S.tokenStrip = tokenStrip; S.fmt = fmt;
  S.unpack = unpack; S.parseSel = parseSel; S.aggregate = aggregate; S.dmr = dmr;
  function guarded(name, fn, el) {
    try { fn(); } catch (err) {
      S.errors.push(name + ": " + err.message);
      console.error("sinkscope report, " + name + ":", err);
      if (el) {
        const p = document.createElement("p");
        p.className = "ss-error";
        p.textContent = String(err);
        el.appendChild(p);
      }
    }
  }
  guarded("grid", initGrid, $("#sec-grid"));
  S.timings.grid = performance.now() - t0;
  guarded("tokens", initTokens, $("#sec-tokens"));
  guarded("curves", initCurves, $("#sec-curves"));
  guarded("tables", initTables, null);
  for (const [name, fn] of window.SINKSCOPE_SECTIONS || []) {
    const el = document.getElementById("sec-" + name);
    guarded("section " + name, () => fn(el, (D.sections || {})[name], S), el);
  }
  S.timings.total = performance.now() - t0;
  S.ready = true;
  document.documentElement.dataset.ready = "1";
})();
