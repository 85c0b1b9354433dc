// lmforge dashboard: polls /api/runs, fetches the (server-downsampled) curves of the
// runs shown whenever their metrics grew, and draws every chart as plain SVG.
"use strict";

const POLL_MS = 2000;
const MAX_SHOWN = 8;
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2",
  "#db2777", "#65a30d", "#4b5563", "#9333ea"];
const CHARTS = [
  { key: "loss", title: "loss (train, val dashed)", series: ["loss"], val: "val_loss", band: true },
  { key: "lr", title: "learning rate", series: ["lr"] },
  { key: "grad_norm", title: "gradient norm", series: ["grad_norm"] },
  { key: "tokens_per_s", title: "tokens/s", series: ["tokens_per_s"] },
  { key: "mfu", title: "MFU", series: ["mfu"], percent: true },
];
const CLASSIFIER = ["val_accuracy", "val_f1_macro", "val_precision_macro", "val_recall_macro", "val_mcc"];
const SVG = "http://www.w3.org/2000/svg";
const CURVE_KEYS = [...new Set(CHARTS.flatMap((c) => c.series.concat(c.val || [])).concat(CLASSIFIER))].join(",");

const state = {
  runs: [], sweeps: [], shown: new Set(), chosen: false, focus: null,
  curves: new Map(), // id -> {lines, curves}
  samplesAt: new Map(), sweep: null, sort: { key: "value", asc: true },
};

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};
const svg = (tag, attrs = {}) => {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
};

async function getJSON(url) {
  const res = await fetch(url, { cache: "no-store" });
  if (!res.ok) throw new Error(`${url}: ${res.status} ${(await res.json()).error || ""}`);
  return res.json();
}

// A run keeps the colour it was first shown in; a newly shown run takes the first
// colour no other shown run has, so up to ten overlaid runs never share one.
const colours = new Map();
function colour(id) {
  if (!colours.has(id)) {
    const taken = new Set([...state.shown].filter((r) => r !== id).map((r) => colours.get(r)));
    colours.set(id, PALETTE.find((c) => !taken.has(c)) || PALETTE[colours.size % PALETTE.length]);
  }
  return colours.get(id);
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return a >= 1000 ? Math.round(v).toLocaleString("en-US") : v.toFixed(digits);
}

function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

// ---- runs table ----------------------------------------------------------------

function chooseDefaultRuns() {
  if (state.chosen || state.runs.length === 0) return;
  const running = state.runs.filter((r) => r.status === "running");
  const rest = state.runs.filter((r) => r.status !== "running");
  for (const r of running.concat(rest).slice(0, MAX_SHOWN)) state.shown.add(r.id);
  state.focus = state.focus || (running[0] || state.runs[0]).id;
  state.chosen = true;
}

function renderRuns() {
  for (const id of colours.keys()) if (!state.shown.has(id)) colours.delete(id);
  const body = $("#runs tbody");
  body.replaceChildren();
  $("#no-runs").hidden = state.runs.length > 0;
  for (const r of state.runs) {
    const tr = el("tr", { "data-run": r.id });
    if (r.id === state.focus) tr.classList.add("focus");
    const box = el("input", { type: "checkbox", title: "overlay this run's curves" });
    box.checked = state.shown.has(r.id);
    box.addEventListener("click", (e) => {
      e.stopPropagation();
      box.checked ? state.shown.add(r.id) : state.shown.delete(r.id);
      refreshCurves().then(renderCharts);
    });
    const tdBox = el("td"); tdBox.append(box);
    const name = el("td");
    const sw = el("span", { class: "swatch" });
    sw.style.background = state.shown.has(r.id) ? colour(r.id) : "transparent";
    name.append(sw, el("span", { class: "run-name mono", title: r.id }, r.id));
    const status = el("td");
    status.append(el("span", { class: `status ${r.status}`, title: r.error || "" }, r.status));
    const step = el("td", { class: "num step" }, r.max_steps ? `${r.step} / ${r.max_steps}` : String(r.step));
    const bestName = r.metric.replace(/^val_/, "val ");
    const best = el("td", { class: "num", title: `best ${r.metric} (${r.lower_is_better ? "lower" : "higher"} is better)` },
      r.best === null ? "–" : `${fmt(r.best)} ${bestName === "val loss" ? "" : bestName}`.trim());
    const tok = el("td", { class: "num" }, r.tokens_per_s ? fmt(r.tokens_per_s, 0) : "–");
    const eta = el("td", { class: "num" }, r.status === "running" ? duration(r.eta_s) : "–");
    const warn = el("td");
    if (r.skipped_count > 0) {
      warn.append(el("span", { class: "warn", title: `malformed metrics lines skipped: ${r.skipped_lines.join(", ")}${r.skipped_count > r.skipped_lines.length ? ", …" : ""}` },
        `${r.skipped_count} line${r.skipped_count > 1 ? "s" : ""} skipped`));
    }
    tr.append(tdBox, name, status, step, best, tok, eta, warn);
    tr.addEventListener("click", () => { state.focus = r.id; renderRuns(); renderDetail(true); });
    body.append(tr);
  }
}

// ---- curves ----------------------------------------------------------------------

async function refreshCurves() {
  // About one point per pixel of a chart (they sit two abreast).
  const width = Math.max(200, Math.min(1000, Math.round(($("#charts").clientWidth || 800) / 2)));
  const wanted = state.runs.filter((r) => state.shown.has(r.id));
  await Promise.all(wanted.map(async (r) => {
    const have = state.curves.get(r.id);
    if (have && have.lines === r.lines) return;
    const c = await getJSON(`/api/curves?run=${encodeURIComponent(r.id)}&points=${width}&keys=${CURVE_KEYS}`);
    state.curves.set(r.id, c);
  }));
}

function smooth(ys, weight) {
  // TensorBoard's debiased exponential moving average.
  if (weight <= 0) return ys;
  let last = 0, n = 0;
  return ys.map((y) => { last = last * weight + (1 - weight) * y; n++; return last / (1 - Math.pow(weight, n)); });
}

// A tick's label, with as many decimals as the spacing between ticks needs.
function tickLabel(v, step) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
  if (a >= 1000) return Math.round(v).toLocaleString("en-US");
  return v.toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9))));
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const span = hi - lo, raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function chartSpecs() {
  const shownCurves = [...state.shown].map((id) => state.curves.get(id)).filter(Boolean);
  const specs = CHARTS.slice();
  for (const key of CLASSIFIER) {
    if (shownCurves.some((c) => c.curves[key])) {
      specs.push({ key, title: key.replace(/^val_/, "validation ").replace(/_/g, " "), series: [], val: key });
    }
  }
  return specs;
}

function renderCharts() {
  const holder = $("#charts");
  holder.replaceChildren();
  const xKey = $("#x-axis").value;
  const weight = Number($("#smoothing").value);
  const runs = state.runs.filter((r) => state.shown.has(r.id) && state.curves.has(r.id));
  for (const spec of chartSpecs()) {
    const lines = [];
    for (const r of runs) {
      const c = state.curves.get(r.id).curves;
      for (const k of spec.series) if (c[k]) lines.push({ run: r.id, key: k, pts: c[k], kind: "train" });
      if (spec.val && c[spec.val]) lines.push({ run: r.id, key: spec.val, pts: c[spec.val], kind: "val" });
    }
    holder.append(drawChart(spec, lines, xKey, weight));
  }
  document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
}

function drawChart(spec, lines, xKey, weight) {
  const W = 480, H = 250, L = 52, R = 12, T = 8, B = 28;
  const box = el("div", { class: "chart", "data-chart": spec.key });
  box.append(el("h3", {}, spec.title));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, "data-chart": spec.key });
  box.append(root);
  const logY = spec.key === "loss" && $("#log-loss").checked;
  const ty = (v) => (logY ? Math.log10(Math.max(v, 1e-12)) : v);
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const l of lines) {
    const xs = l.pts[xKey];
    for (let i = 0; i < xs.length; i++) {
      x0 = Math.min(x0, xs[i]); x1 = Math.max(x1, xs[i]);
      y0 = Math.min(y0, ty(l.pts.mean[i])); y1 = Math.max(y1, ty(l.pts.mean[i]));
    }
  }
  if (lines.length === 0 || !isFinite(x0)) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" });
    t.textContent = "no data yet";
    root.append(t);
    return box;
  }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 0.5; y1 += Math.abs(y1) * 0.05 || 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (ty(y) - y0) / (y1 - y0)) * (H - T - B);
  const axis = svg("g", { class: "axis" });
  const yTicks = niceTicks(y0, y1, 5);
  const yStep = yTicks.length > 1 ? yTicks[1] - yTicks[0] : 1;
  for (const t of yTicks) {
    axis.append(svg("line", { x1: L, x2: W - R, y1: T + (1 - (t - y0) / (y1 - y0)) * (H - T - B), y2: T + (1 - (t - y0) / (y1 - y0)) * (H - T - B) }));
    const label = svg("text", { x: L - 4, y: T + (1 - (t - y0) / (y1 - y0)) * (H - T - B) + 3, "text-anchor": "end" });
    const v = logY ? Math.pow(10, t) : t;
    label.textContent = logY ? fmt(v, 2) : spec.percent ? `${tickLabel(100 * v, 100 * yStep)}%` : tickLabel(v, yStep);
    axis.append(label);
  }
  for (const t of niceTicks(x0, x1, 6)) {
    const label = svg("text", { x: px(t), y: H - B + 14, "text-anchor": px(t) > W - R - 16 ? "end" : "middle" });
    label.textContent = xKey === "time" ? duration(t) : tickLabel(t, 1);
    axis.append(label);
  }
  const xTitle = svg("text", { x: W - R, y: H - 2, "text-anchor": "end" });
  xTitle.textContent = xKey === "time" ? "wall time" : "step";
  axis.append(xTitle);
  root.append(axis);
  const path = (xs, ys) => xs.map((x, i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(ys[i]).toFixed(1)}`).join("");
  for (const l of lines) {
    const xs = l.pts[xKey], colourOf = colour(l.run);
    if (l.kind === "val") {
      root.append(svg("path", { class: "val", d: path(xs, l.pts.mean), stroke: colourOf, "data-run": l.run, "data-key": l.key }));
      for (let i = 0; i < xs.length; i++) {
        root.append(svg("circle", { cx: px(xs[i]).toFixed(1), cy: py(l.pts.mean[i]).toFixed(1), r: 2.2, fill: colourOf }));
      }
      continue;
    }
    if (spec.band && l.pts.min.some((v, i) => v !== l.pts.max[i])) {
      const top = xs.map((x, i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(l.pts.max[i]).toFixed(1)}`).join("");
      const bottom = xs.map((x, i) => `L${px(x).toFixed(1)},${py(l.pts.min[i]).toFixed(1)}`).reverse().join("");
      root.append(svg("path", { class: "band", d: `${top}${bottom}Z`, fill: colourOf }));
    }
    const smoothed = smooth(l.pts.mean, xs.length > 20 ? weight : 0);
    if (smoothed !== l.pts.mean) root.append(svg("path", { class: "raw", d: path(xs, l.pts.mean), stroke: colourOf }));
    root.append(svg("path", { class: "curve", d: path(xs, smoothed), stroke: colourOf, "data-run": l.run, "data-key": l.key }));
  }
  hover(root, lines, xKey, px, py, L, W - R, T, H - B, spec);
  return box;
}

// A vertical rule that follows the mouse and names each curve's value there.
function hover(root, lines, xKey, px, py, left, right, top, bottom, spec) {
  const g = svg("g", { class: "hover", visibility: "hidden" });
  const rule = svg("line", { y1: top, y2: bottom });
  g.append(rule);
  root.append(g);
  root.addEventListener("mousemove", (e) => {
    const r = root.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width) * root.viewBox.baseVal.width;
    if (x < left || x > right) { g.setAttribute("visibility", "hidden"); return; }
    g.setAttribute("visibility", "visible");
    rule.setAttribute("x1", x); rule.setAttribute("x2", x);
    g.querySelectorAll("text").forEach((t) => t.remove());
    let row = 0;
    for (const l of lines) {
      const xs = l.pts[xKey];
      let best = 0;
      for (let i = 1; i < xs.length; i++) if (Math.abs(px(xs[i]) - x) < Math.abs(px(xs[best]) - x)) best = i;
      const v = l.pts.mean[best];
      const t = svg("text", { x: Math.min(x + 4, right - 120), y: top + 10 + 11 * row++, fill: colour(l.run) });
      t.textContent = `${l.key} ${spec.percent ? fmt(100 * v, 2) + "%" : fmt(v)} @ ${xKey === "time" ? duration(xs[best]) : fmt(xs[best], 0)}`;
      g.append(t);
    }
  });
  root.addEventListener("mouseleave", () => g.setAttribute("visibility", "hidden"));
}

// ---- samples and config ---------------------------------------------------------------

async function renderDetail(force) {
  const run = state.runs.find((r) => r.id === state.focus);
  $("#focus-name").textContent = run ? run.id : "";
  if (!run) return;
  if (force || state.samplesAt.get(run.id) !== run.lines) {
    state.samplesAt.set(run.id, run.lines);
    const s = await getJSON(`/api/samples?run=${encodeURIComponent(run.id)}&n=5`);
    const holder = $("#tab-samples");
    holder.replaceChildren();
    if (s.samples.length === 0) holder.append(el("p", { class: "muted" }, "No samples: a causal LM writes one at each evaluation (samples.jsonl)."));
    for (const sample of s.samples.reverse()) {
      const d = el("div", { class: "sample" });
      d.append(el("div", { class: "muted" }, `step ${sample.step}`), el("pre", {}, sample.text));
      holder.append(d);
    }
  }
  if (force) await renderConfig();
}

function note(text, span) {
  const tr = el("tr");
  tr.append(el("td", { colspan: span }, text));
  return tr;
}

async function renderConfig() {
  const run = state.focus;
  if (!run) return;
  const compare = $("#compare");
  const keep = compare.value;
  compare.replaceChildren(el("option", { value: "" }, "—"));
  for (const r of state.runs) if (r.id !== run) compare.append(el("option", { value: r.id }, r.id));
  compare.value = state.runs.some((r) => r.id === keep) && keep !== run ? keep : "";
  const table = $("#config");
  table.replaceChildren();
  if (compare.value) {
    const d = await getJSON(`/api/diff?a=${encodeURIComponent(run)}&b=${encodeURIComponent(compare.value)}`);
    const head = el("tr"); head.append(el("th", {}, "key"), el("th", {}, run), el("th", {}, compare.value));
    table.append(head);
    if (d.diff.length === 0) table.append(note("same config", 3));
    for (const row of d.diff) {
      const tr = el("tr", { class: "changed" });
      tr.append(el("td", {}, row.key), el("td", { class: "mono" }, JSON.stringify(row.a)), el("td", { class: "mono" }, JSON.stringify(row.b)));
      table.append(tr);
    }
    return;
  }
  const c = await getJSON(`/api/config?run=${encodeURIComponent(run)}`);
  if (!c.config) { table.append(note("no config recorded yet", 2)); return; }
  for (const [k, v] of Object.entries(c.config)) {
    const tr = el("tr");
    tr.append(el("td", {}, k), el("td", { class: "mono" }, typeof v === "object" ? JSON.stringify(v) : String(v)));
    table.append(tr);
  }
}

// ---- sweeps -------------------------------------------------------------------------------

async function renderSweep() {
  const panel = $("#sweeps-panel");
  panel.hidden = state.sweeps.length === 0;
  if (panel.hidden) return;
  const select = $("#sweep-select");
  if (select.options.length !== state.sweeps.length) {
    const keep = select.value;
    select.replaceChildren(...state.sweeps.map((s) => el("option", { value: s }, s)));
    if (state.sweeps.includes(keep)) select.value = keep;
  }
  try {
    state.sweep = await getJSON(`/api/sweep?id=${encodeURIComponent(select.value)}`);
  } catch (e) {
    $("#sweep-chart").textContent = String(e);
    return;
  }
  drawSweepChart();
  drawSweepTable();
}

function bestTrial(sw) {
  const done = sw.trials.filter((t) => t.state === "finished");
  const sign = sw.goal === "minimize" ? 1 : -1;
  return done.reduce((b, t) => (b === null || sign * t.value < sign * b.value ? t : b), null);
}

function drawSweepChart() {
  const sw = state.sweep, W = 900, H = 220, L = 52, R = 12, T = 10, B = 28;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, "data-chart": "sweep" });
  const pts = sw.trials.filter((t) => t.value !== null);
  const holder = $("#sweep-chart");
  holder.replaceChildren(root);
  if (pts.length === 0) return;
  let y0 = Math.min(...pts.map((t) => t.value)), y1 = Math.max(...pts.map((t) => t.value));
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const n = Math.max(sw.trials.length, 2);
  const px = (i) => L + (i / (n - 1)) * (W - L - R), py = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const axis = svg("g", { class: "axis" });
  for (const t of niceTicks(y0, y1, 4)) {
    axis.append(svg("line", { x1: L, x2: W - R, y1: py(t), y2: py(t) }));
    const label = svg("text", { x: L - 4, y: py(t) + 3, "text-anchor": "end" }); label.textContent = fmt(t, 3); axis.append(label);
  }
  for (const t of niceTicks(0, n - 1, 10).filter(Number.isInteger)) {
    const label = svg("text", { x: px(t), y: H - B + 14, "text-anchor": "middle" }); label.textContent = String(t); axis.append(label);
  }
  const title = svg("text", { x: W - R, y: H - 2, "text-anchor": "end" }); title.textContent = `trial (${sw.metric}, ${sw.goal}; × pruned)`; axis.append(title);
  root.append(axis);
  root.classList.add("chart");
  const best = bestTrial(sw);
  for (const t of pts) {
    const x = px(t.trial), y = py(t.value);
    if (t.state === "pruned") {
      const m = svg("path", { d: `M${x - 4},${y - 4}L${x + 4},${y + 4}M${x - 4},${y + 4}L${x + 4},${y - 4}`, stroke: "#d97706", "stroke-width": 2, "data-trial": t.trial, class: "pruned" });
      root.append(m);
    } else {
      root.append(svg("circle", { cx: x, cy: y, r: best && best.trial === t.trial ? 6 : 4, fill: best && best.trial === t.trial ? "#059669" : "#2563eb", "data-trial": t.trial, class: "finished" }));
    }
  }
}

function drawSweepTable() {
  const sw = state.sweep;
  const params = [...new Set(sw.trials.flatMap((t) => Object.keys(t.params)))].sort();
  const cols = ["trial", "state", "value", "step", ...params];
  const head = el("tr");
  for (const c of cols) {
    const th = el("th", { "data-key": c }, c === "value" ? sw.metric : c);
    if (state.sort.key === c) th.classList.add("sorted", ...(state.sort.asc ? ["asc"] : []));
    th.addEventListener("click", () => {
      state.sort = { key: c, asc: state.sort.key === c ? !state.sort.asc : true };
      drawSweepTable();
    });
    head.append(th);
  }
  $("#sweep-table thead").replaceChildren(head);
  const cell = (t, c) => (c in t && c !== "params" ? t[c] : t.params[c]);
  const rows = sw.trials.slice().sort((a, b) => {
    const x = cell(a, state.sort.key), y = cell(b, state.sort.key);
    const d = x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : x > y ? 1 : 0;
    return state.sort.asc ? d : -d;
  });
  const best = bestTrial(sw);
  const body = $("#sweep-table tbody");
  body.replaceChildren();
  for (const t of rows) {
    const tr = el("tr", { class: `${t.state}${best && best.trial === t.trial ? " best" : ""}`, "data-trial": t.trial, title: t.error || "click: overlay this trial's curves" });
    for (const c of cols) {
      const v = cell(t, c);
      tr.append(el("td", { class: typeof v === "number" ? "num" : "" }, typeof v === "number" && c !== "trial" && c !== "step" ? fmt(v) : v === null || v === undefined ? "–" : String(v)));
    }
    tr.addEventListener("click", () => {
      state.shown.add(t.run);
      refreshCurves().then(() => { renderRuns(); renderCharts(); });
    });
    body.append(tr);
  }
}

// ---- the loop -------------------------------------------------------------------------------

async function poll() {
  try {
    const o = await getJSON("/api/runs");
    // Running runs first, then by name.
    state.runs = o.runs.sort((a, b) => (b.status === "running") - (a.status === "running") || a.id.localeCompare(b.id));
    state.sweeps = o.sweeps;
    $("#root").textContent = o.root;
    chooseDefaultRuns();
    renderRuns();
    const before = [...state.shown].map((id) => (state.curves.get(id) || {}).lines).join();
    await refreshCurves();
    const after = [...state.shown].map((id) => (state.curves.get(id) || {}).lines).join();
    if (before !== after || !document.body.dataset.rendered) renderCharts();
    await renderDetail(!document.body.dataset.detail);
    document.body.dataset.detail = "1";
    await renderSweep();
    $("#live").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("#live").textContent = `cannot reach the dashboard: ${e.message}`;
  }
  setTimeout(poll, POLL_MS);
}

$("#show-all").addEventListener("change", () => {
  state.shown = new Set($("#show-all").checked ? state.runs.map((r) => r.id) : []);
  renderRuns();
  refreshCurves().then(renderCharts);
});
$("#x-axis").addEventListener("change", renderCharts);
$("#log-loss").addEventListener("change", renderCharts);
$("#smoothing").addEventListener("input", () => {
  $("#smoothing-value").textContent = Number($("#smoothing").value).toFixed(2);
  renderCharts();
});
$("#compare").addEventListener("change", renderConfig);
$("#sweep-select").addEventListener("change", renderSweep);
for (const b of document.querySelectorAll(".tabs button")) {
  b.addEventListener("click", () => {
    for (const o of document.querySelectorAll(".tabs button")) o.classList.toggle("active", o === b);
    $("#tab-samples").hidden = b.dataset.tab !== "samples";
    $("#tab-config").hidden = b.dataset.tab !== "config";
  });
}
poll();
