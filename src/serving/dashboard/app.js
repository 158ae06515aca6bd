// The lambda-ctl dashboard: reads the server's own HTTP API every few seconds and draws
// pipelines, workflows and a chart of one view. No dependencies, no requests elsewhere.
"use strict";

const REFRESH_MS = 2000;
const HISTORY = 60;
const params = new URLSearchParams(location.hash.slice(1));
let token = params.get("token") || sessionStorage.getItem("lambda-token") || "";
if (params.get("token")) {
  sessionStorage.setItem("lambda-token", token);
  // Keep the token out of the address bar (and of screenshots and history).
  params.delete("token");
  history.replaceState(null, "", location.pathname + (params.toString() ? "#" + params : ""));
}
let selected = params.get("view") || "";
let metric = params.get("metric") || "";
const history_ = []; // { total } per refresh of the selected view

async function api(path) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch(path, { headers });
    if (r.status === 401 && attempt === 0) {
      const given = window.prompt("lambda-ctl token (serve.token):");
      if (given === null) break;
      token = given;
      sessionStorage.setItem("lambda-token", token);
      continue;
    }
    return r;
  }
  throw new Error("unauthorized: this server needs its bearer token (#token=… in the URL)");
}

function el(tag, attrs, ...children) {
  const ns = ["svg", "rect", "polyline", "text", "line", "title"].includes(tag)
    ? "http://www.w3.org/2000/svg" : null;
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmt(n, digits = 0) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en", { maximumFractionDigits: digits });
}

function age(ms) {
  const s = Math.round(ms / 1000);
  return s < 60 ? s + "s" : Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
}

// Late events over the pipeline's views (the restatement ledger), each view in the tooltip.
function lateCell(restated) {
  const views = Object.entries(restated);
  const late = views.reduce((n, [, t]) => n + t.late_events, 0);
  const worst = views.reduce((m, [, t]) => Math.max(m, t.max_lateness_ms), 0);
  const title = views.map(([v, t]) => v + ": " + fmt(t.late_events) + " late, " +
    fmt(t.restated_windows) + " restated windows").join("\n");
  return el("td", { class: "num", "data-late": late, title },
    views.length ? fmt(late) + (worst > 0 ? " (≤ " + lateness(worst) + ")" : "") : "–");
}

function lateness(ms) {
  const s = Math.round(ms / 1000);
  if (s >= 86400) return Math.floor(s / 86400) + "d" + String(Math.floor(s % 86400 / 3600)).padStart(2, "0") + "h";
  if (s >= 3600) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  return age(ms);
}

// The latest `verify`: ok or FAILED, and when.
function verifiedCell(v) {
  if (!v) return el("td", { "data-verified": "never" }, "never");
  const ago = at => at ? age(Date.now() - Date.parse(at)) + " ago" : "never";
  return el("td", { "data-verified": v.ok ? "ok" : "failed", class: v.ok ? "" : "error",
    title: v.ok ? "" : v.problems + " problem(s); last ok " + ago(v.last_success) },
    (v.ok ? "ok " : "FAILED ") + ago(v.at));
}

function drawPipelines(list) {
  const body = document.querySelector("#pipelines tbody");
  body.replaceChildren(...list.map(p => el("tr", { "data-pipeline": p.name },
    el("td", {}, p.name), el("td", {}, p.source),
    el("td", { class: "num" }, fmt(p.accepted)), el("td", { class: "num" }, fmt(p.rejected)),
    el("td", { class: "num" }, fmt(p.duplicates)), el("td", { class: "num" }, fmt(p.ingest_rate, 1)),
    el("td", {}, p.open_segment_rows ? fmt(p.open_segment_rows) + " rows, " + age(p.open_segment_age_ms) : "empty"),
    el("td", { class: "num" }, fmt(p.sealed_segments)),
    el("td", { class: "num" }, p.ack_to_visible_p99_s == null ? "–" : "≤ " + fmt(p.ack_to_visible_p99_s * 1000, 1) + " ms"),
    lateCell(p.restated || {}), verifiedCell(p.verified))));
  const select = document.getElementById("view-select");
  const options = list.flatMap(p => p.views.map(v => p.name + "." + v));
  if (select.options.length !== options.length) {
    select.replaceChildren(...options.map(o => el("option", { value: o }, o)));
  }
  if (!options.includes(selected)) selected = options[0] || "";
  select.value = selected;
}

// The nodes sharing the pipelines' partitions (`serve --node`); hidden without any.
async function drawNodes() {
  const r = await api("/v1/nodes");
  if (!r.ok) return;
  const list = (await r.json()).nodes;
  document.getElementById("nodes-section").hidden = list.length === 0;
  document.querySelector("#nodes tbody").replaceChildren(...list.map(n => el("tr", { "data-node": n.name },
    el("td", {}, n.name), el("td", {}, n.listen),
    el("td", { class: n.alive ? "" : "error" }, age(n.heartbeat_age_ms) + " ago"),
    el("td", {}, n.partitions.length ? n.partitions.join(" ") : "–"))));
}

async function drawWorkflows() {
  const box = document.getElementById("workflows");
  let r;
  try { r = await api("/v1/workflows"); } catch (e) { return; }
  if (!r.ok) { // an older server has no workflow endpoint: leave the section empty
    box.replaceChildren(el("p", { class: "muted" }, "no workflow information from this server"));
    return;
  }
  const { workflows } = await r.json();
  if (!workflows.length) { box.replaceChildren(el("p", { class: "muted" }, "no workflows")); return; }
  box.replaceChildren(...workflows.map(w => el("div", { class: "workflow", "data-workflow": w.name },
    el("h3", {}, w.name + "  ", el("span", { class: "muted" },
      (w.schedule ? w.schedule + " (" + w.timezone + ")" : "manual") +
      (w.next_fire ? " · next " + w.next_fire : ""))),
    el("table", {}, el("tbody", {}, ...(w.runs || []).slice(0, 5).map(run => el("tr", {},
      el("td", {}, "#" + run.id), el("td", { class: "state-" + run.state }, run.state),
      el("td", {}, run.scheduled_at || "manual"), el("td", {}, run.started_at || "–"),
      el("td", {}, run.finished_at || "–"))))))));
}

function numericColumns(rows) {
  const skip = new Set(["window_start", "window_end", "_origin"]);
  const first = rows[0] || {};
  return Object.keys(first).filter(k => !skip.has(k) && typeof first[k] === "number");
}

function label(row, keys) {
  const parts = [];
  if (row.window_start) parts.push(row.window_start.slice(11, 16));
  for (const k of keys) parts.push(String(row[k]));
  return parts.join(" ") || "all";
}

async function drawChart() {
  const svg = document.getElementById("chart");
  const caption = document.getElementById("chart-caption");
  if (!selected) { caption.textContent = "no view"; return; }
  const [pipeline, view] = selected.split(".");
  const r = await api("/v1/views/" + encodeURIComponent(pipeline) + "/" + encodeURIComponent(view) + "?origin=1");
  if (!r.ok) throw new Error(selected + ": " + ((await r.json()).error || r.status));
  const answer = await r.json();
  const rows = answer.rows.slice(-40);
  const metrics = numericColumns(answer.rows);
  const metricSelect = document.getElementById("metric-select");
  if ([...metricSelect.options].map(o => o.value).join() !== metrics.join()) {
    metricSelect.replaceChildren(...metrics.map(m => el("option", { value: m }, m)));
  }
  if (!metrics.includes(metric)) metric = metrics[0] || "";
  metricSelect.value = metric;
  const keys = Object.keys(answer.rows[0] || {}).filter(k =>
    !["window_start", "window_end", "_origin"].includes(k) && !metrics.includes(k));
  const total = answer.rows.reduce((s, row) => s + (Number(row[metric]) || 0), 0);
  history_.push(total);
  if (history_.length > HISTORY) history_.shift();

  const W = 900, H = 300, top = 20, bottom = 40, plotH = H - top - bottom;
  const max = Math.max(1, ...rows.map(row => Number(row[metric]) || 0));
  const step = W / Math.max(rows.length, 1);
  const bars = rows.map((row, i) => {
    const v = Number(row[metric]) || 0, h = (v / max) * plotH;
    return el("rect", { class: row._origin || "both", x: (i * step + step * 0.1).toFixed(1),
      y: (top + plotH - h).toFixed(1), width: (step * 0.8).toFixed(1), height: h.toFixed(1),
      "data-origin": row._origin || "" }, el("title", {}, label(row, keys) + ": " + fmt(v, 2) + " (" + row._origin + ")"));
  });
  const every = Math.ceil(rows.length / 12); // at most 12 labels
  const labels = rows.flatMap((row, i) => i % every ? [] : [el("text",
    { x: (i * step + step / 2).toFixed(1), y: H - bottom + 14, "text-anchor": "middle" }, label(row, keys))]);
  // The total of the view at each refresh, scaled to its own maximum, across the chart.
  const hmax = Math.max(1, ...history_);
  const points = history_.map((t, i) =>
    ((i / Math.max(history_.length - 1, 1)) * W).toFixed(1) + "," + (top + plotH - (t / hmax) * plotH).toFixed(1)).join(" ");
  svg.replaceChildren(...bars, ...labels, el("polyline", { points }),
    el("text", { x: 6, y: 14 }, metric + " · max " + fmt(max, 2) + " · total " + fmt(total, 2)));
  svg.setAttribute("data-view", selected);
  svg.setAttribute("data-metric", metric);
  svg.setAttribute("data-total", String(total));
  svg.setAttribute("data-rows", String(answer.rows.length));
  svg.setAttribute("data-batch-rows", String(answer.as_of.batch_rows));
  svg.setAttribute("data-speed-rows", String(answer.as_of.speed_rows));
  caption.textContent = answer.rows.length + " rows · batch run " + (answer.as_of.batch_run || "none") +
    " · " + answer.as_of.batch_rows + " partial rows from batch, " + answer.as_of.speed_rows + " from speed";
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const r = await api("/v1/pipelines");
    if (!r.ok) throw new Error("/v1/pipelines: " + r.status);
    drawPipelines((await r.json()).pipelines);
    await drawChart();
    await drawNodes();
    await drawWorkflows();
    error.hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    error.textContent = String(e.message || e);
    error.hidden = false;
  }
}

document.getElementById("view-select").addEventListener("change", e => {
  selected = e.target.value; metric = ""; history_.length = 0; refresh();
});
document.getElementById("metric-select").addEventListener("change", e => {
  metric = e.target.value; history_.length = 0; refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
