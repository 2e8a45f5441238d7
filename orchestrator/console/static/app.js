/* lorafleet console: one page, hash routes, the /v1 API as its only data source.
 *
 * The token lives in sessionStorage (this tab's session only) and goes out as a bearer header;
 * every text from the API is put on the page as text (never as HTML). Charts are uPlot.
 * Views: #/jobs, #/jobs/ID, #/adapters, #/adapters/NS/NAME/VERSION, #/serving.
 */
"use strict";

const TOKEN_KEY = "lorafleet.token";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const main = document.getElementById("main");
let teardown = [];  // what the current view must stop when the user leaves it

// -- small helpers ------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = String(v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** Replace a node's children; arrays are flattened, null and false left out. */
function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

const token = () => sessionStorage.getItem(TOKEN_KEY);
const when = (s) => (s ? new Date(s * 1000).toLocaleString() : "-");
const num = (v, digits = 4) => (typeof v === "number" ? Number(v.toPrecision(digits)) : "-");
const short = (s, n = 12) => (s ? String(s).slice(0, n) : "-");

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function url(path) { return new URL(path, document.baseURI).toString(); }

async function api(path, opts = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(opts.headers || {}) };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url(path), {
    method: opts.method || "GET", headers, signal: opts.signal,
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    if (res.status === 401) { sessionStorage.removeItem(TOKEN_KEY); }
    throw new ApiError(res.status, (body.error && body.error.message) || res.statusText);
  }
  return body;
}

async function allPages(path, max = 1000) {
  const out = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(after ? `${path}${sep}after=${encodeURIComponent(after)}` : path);
    out.push(...page.data);
    if (!page.has_more || out.length >= max) return out;
    after = page.last_id;
  }
}

async function jobEvents(jobId) {  // every event of a job, in order
  const out = [];
  let after = 0;
  for (;;) {
    const page = await api(`v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=1000&after=${after}`);
    out.push(...page.data);
    if (!page.has_more || !page.data.length) return out;
    after = page.data[page.data.length - 1].id;
  }
}

/** Follow a job's server-sent events (fetch, so the bearer header goes too). */
async function followEvents(jobId, onEvent, signal) {
  const res = await fetch(url(`v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`), {
    headers: { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" }, signal,
  });
  if (!res.ok) throw new ApiError(res.status, "could not follow the job's events");
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(kind, JSON.parse(data));
    }
  }
}

function errorBox(err) {
  return el("div", { class: "error", role: "alert", text: err.message || String(err) });
}

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows));
}

function stateCell(state) { return el("span", { class: `state state-${state}`, text: state }); }

// -- charts --------------------------------------------------------------------------------------
/** A step → value chart of named series; ``update(xs, ys…)`` redraws it. */
function lineChart(container, names, title) {
  const colors = ["#2457c5", "#d9822b", "#1c7c3c", "#8e44ad"];
  const opts = {
    title, width: Math.max(320, container.clientWidth || 560), height: 240,
    scales: { x: { time: false } }, axes: [{ label: "step" }, {}],
    series: [{ label: "step" }, ...names.map((n, i) => ({
      label: n, stroke: colors[i % colors.length], width: 2, spanGaps: true,
      points: { show: true, size: 4 },
    }))],
  };
  const plot = new uPlot(opts, [[], ...names.map(() => [])], container);
  teardown.push(() => plot.destroy());
  return {
    update(data) {
      plot.setData(data);
      container.dataset.points = String(data[0].length);
    },
  };
}

/** Align several step → value series on one x axis (uPlot wants shared xs). */
function align(seriesList) {
  const steps = [...new Set(seriesList.flatMap((s) => [...s.keys()]))].sort((a, b) => a - b);
  return [steps, ...seriesList.map((s) => steps.map((x) => (s.has(x) ? s.get(x) : null)))];
}

function curves(events) {  // loss and eval loss by step, from metrics events
  const loss = new Map(), evalLoss = new Map();
  for (const e of events) {
    if (e.type !== "metrics") continue;
    const d = e.data;
    if (typeof d.loss === "number") loss.set(d.step, d.loss);
    if (typeof d.eval_loss === "number") evalLoss.set(d.step, d.eval_loss);
  }
  return { loss, evalLoss };
}

// -- views ---------------------------------------------------------------------------------------
function signin(message) {
  const input = el("input", { id: "token", type: "password", placeholder: "API token", autocomplete: "off" });
  const status = el("div");
  const form = el("form", { class: "card signin", onsubmit: async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await whoami();
      location.hash = "#/jobs";
      render();
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      fill(status, errorBox(err));
    }
  } },
  el("h1", { text: "Sign in" }),
  el("p", { class: "muted", text: "An API token: the admin token, or a namespace token (you see its namespace only). It stays in this browser tab's session." }),
  input, el("button", { class: "primary", type: "submit", text: "Sign in" }), status);
  if (message) status.append(errorBox({ message }));
  fill(main, form);
  input.focus();
}

let me = null;
async function whoami() {
  me = await api("v1/me");
  document.getElementById("who").textContent =
    me.namespace ? `${me.namespace} · ${me.scope} token` : "admin token";
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = false;
  return me;
}

async function jobsView() {
  const stateSel = el("select", { id: "state-filter" },
    ["", "queued", "starting", "running", "retrying", "succeeded", "failed", "cancelled"]
      .map((s) => el("option", { value: s, text: s || "any state" })));
  const nsInput = el("input", { id: "namespace-filter", placeholder: "namespace" });
  const textInput = el("input", { id: "text-filter", placeholder: "name or base contains…" });
  const body = el("div");
  const load = async () => {
    const params = new URLSearchParams({ limit: "100" });
    if (stateSel.value) params.set("state", stateSel.value);
    if (nsInput.value.trim()) params.set("namespace", nsInput.value.trim());
    try {
      const page = await api(`v1/fine_tuning/jobs?${params}`);
      const needle = textInput.value.trim().toLowerCase();
      const rows = page.data.filter((j) => !needle ||
        `${j.name} ${j.model || ""} ${j.id}`.toLowerCase().includes(needle));
      fill(body, rows.length ? table(
        ["job", "namespace", "name", "state", "base", "progress", "created"],
        rows.map((j) => el("tr", { class: "link", "data-job": j.id, onclick: () => { location.hash = `#/jobs/${j.id}`; } },
          el("td", { text: j.id }), el("td", { text: j.namespace }), el("td", { text: j.name }),
          el("td", {}, stateCell(j.status)), el("td", { text: j.model || "-" }),
          el("td", {}, progressCell(j)), el("td", { text: when(j.created_at) })))) :
        el("p", { class: "muted", text: "No jobs match." }));
    } catch (err) { fill(body, errorBox(err)); }
  };
  for (const c of [stateSel, nsInput, textInput]) c.addEventListener("input", load);
  fill(main, el("h1", { text: "Jobs" }), el("div", { class: "filters" }, stateSel, nsInput, textInput), body);
  await load();
  const timer = setInterval(load, 3000);
  teardown.push(() => clearInterval(timer));
}

function progressCell(j) {
  const p = j.progress;
  if (!p || !p.step) return el("span", { class: "muted", text: "-" });
  const frac = p.max_steps ? Math.min(1, p.step / p.max_steps) : 0;
  const fill = el("span");
  fill.style.width = `${(frac * 100).toFixed(0)}%`;  // CSSOM, not a style attribute: the CSP allows it
  return el("span", {}, el("span", { class: "bar" }, fill), `${p.step}${p.max_steps ? `/${p.max_steps}` : ""}`);
}

async function jobView(jobId) {
  const head = el("div", { class: "card" });
  const chartBox = el("div", { class: "chart", id: "loss-chart", "data-points": "0" });
  // a method's own curves (DPO's rewards in TRL's names, GRPO's reward), shown when they come
  const methodBox = el("div", { class: "chart", id: "method-chart", "data-points": "0" });
  const methodCard = el("div", { class: "card" }, el("h2", { text: "Rewards" }), methodBox);
  methodCard.hidden = true;
  const log = el("pre", { class: "log", id: "event-log" });
  const params = el("div");
  fill(main, el("h1", { text: `Job ${jobId}` }), head,
    el("div", { class: "card" }, el("h2", { text: "Loss and eval loss" }), chartBox), methodCard,
    el("div", { class: "grid" },
      el("div", {}, el("h2", { text: "Events" }), log),
      el("div", {}, el("h2", { text: "Hyperparameters" }), params)));
  const showJob = async () => {
    const j = await api(`v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
    const cancel = TERMINAL.has(j.status) ? null : el("button", { class: "danger", id: "cancel", text: "Cancel job", onclick: async () => {
      try { await api(`v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }); await showJob(); }
      catch (err) { head.append(errorBox(err)); }
    } });
    fill(head, 
      el("div", {}, "state ", el("span", { id: "job-state" }, stateCell(j.status)),
        j.status_reason ? el("span", { class: "muted", text: ` — ${j.status_reason}` }) : null),
      el("div", { text: `${j.namespace}/${j.name} on ${j.model} · data ${j.training_file}` }),
      el("div", { class: "muted", text: `created ${when(j.created_at)} · attempts ${j.attempts}${j.pack_id ? ` · pack ${j.pack_id}` : ""}` }),
      j.error ? errorBox({ message: j.error }) : null,
      j.fine_tuned_model ? el("div", {}, "adapter ", el("a", { href: `#/adapters/${j.fine_tuned_model.replace(":", "/")}`, text: j.fine_tuned_model })) : null,
      cancel);
    fill(params, el("pre", { text: JSON.stringify(j.hyperparameters, null, 2) }));
    return j;
  };
  await showJob();
  const chart = lineChart(chartBox, ["loss", "eval loss"]);
  const loss = new Map(), evalLoss = new Map();
  const METHOD_SERIES = ["rewards/accuracies", "rewards/margins", "reward/mean", "reward/std"];
  const methodSeries = METHOD_SERIES.map(() => new Map());
  let methodChart = null;
  const controller = new AbortController();
  teardown.push(() => controller.abort());
  let pending = false;
  const redraw = () => {  // coalesce a burst of events into one redraw per frame
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      chart.update(align([loss, evalLoss]));
      if (methodSeries.some((s) => s.size)) {
        methodCard.hidden = false;
        methodChart = methodChart || lineChart(methodBox, METHOD_SERIES);
        methodChart.update(align(methodSeries));
      }
    });
  };
  followEvents(jobId, (kind, e) => {
    if (kind === "end") { showJob(); return; }
    log.append(`${new Date(e.created_at * 1000).toLocaleTimeString()} ${e.type} ${JSON.stringify(e.data)}\n`);
    if (e.type === "metrics") {
      if (typeof e.data.loss === "number") loss.set(e.data.step, e.data.loss);
      if (typeof e.data.eval_loss === "number") evalLoss.set(e.data.step, e.data.eval_loss);
      METHOD_SERIES.forEach((name, i) => {
        if (typeof e.data[name] === "number") methodSeries[i].set(e.data.step, e.data[name]);
      });
      redraw();
    } else if (e.type === "state" || e.type === "adapter") { showJob(); }
  }, controller.signal).catch((err) => { if (err.name !== "AbortError") log.append(`(stream ended: ${err.message})\n`); });
}

async function adaptersView() {
  const versions = await allPages("v1/adapters?limit=100");
  const byNs = new Map();
  for (const v of versions) {
    if (!byNs.has(v.namespace)) byNs.set(v.namespace, new Map());
    const names = byNs.get(v.namespace);
    if (!names.has(v.name)) names.set(v.name, []);
    names.get(v.name).push(v);
  }
  const sections = [...byNs.keys()].sort().map((ns) => el("div", { class: "card" },
    el("h2", { text: ns }),
    table(["adapter", "versions", "aliases", "base", "newest metrics"],
      [...byNs.get(ns).entries()].sort().map(([name, vs]) => el("tr", {},
        el("td", { text: name }),
        el("td", {}, vs.map((v) => el("a", { href: `#/adapters/${ns}/${name}/${v.version}`, class: "version", text: `v${v.version} ` }))),
        el("td", { text: vs.flatMap((v) => v.aliases.map((a) => `@${a}→v${v.version}`)).join(" ") || "-" }),
        el("td", { text: vs[0].base_model.name }),
        el("td", { text: metricsLine(vs[0].metrics) }))))));
  fill(main, el("h1", { text: "Adapters" }),
    ...(sections.length ? sections : [el("p", { class: "muted", text: "No adapters yet." })]));
}

function metricsLine(m) {
  const keys = ["eval_loss", "eval_loss_final", "tokens_per_s", "steps"];
  return keys.filter((k) => m && typeof m[k] === "number").map((k) => `${k} ${num(m[k])}`).join(" · ") || "-";
}

function lineage(v, job, file) {
  const boxes = [
    ["version", v.id],
    ["job", v.lineage.job_id || "(imported)"],
    ["dataset file", file ? `${file.id} · ${short(file.sha256)}` : (v.lineage.dataset_sha256 ? `sha256 ${short(v.lineage.dataset_sha256)}` : "-")],
    ["base", `${v.base_model.name} · ${short(v.base_model.fingerprint)}`],
  ];
  const w = 230, h = 46, gap = 40;
  const g = svg("svg", { class: "lineage", id: "lineage", width: boxes.length * (w + gap), height: h + 10, role: "img" });
  boxes.forEach(([label, value], i) => {
    const x = i * (w + gap) + 2;
    if (i > 0) g.append(svg("line", { x1: x - gap, y1: h / 2 + 2, x2: x, y2: h / 2 + 2, "marker-end": "" }));
    g.append(svg("rect", { x, y: 2, width: w, height: h, rx: 5 }));
    g.append(svg("text", { x: x + 8, y: 18, fill: "#5f6b7a" }, label));
    g.append(svg("text", { x: x + 8, y: 36, "data-node": label }, value));
  });
  const links = el("div", { class: "muted" },
    job ? el("a", { href: `#/jobs/${job.id}`, text: `open job ${job.id}` }) : null,
    file ? ` · dataset ${file.filename} (${file.rows} rows)` : null);
  return el("div", {}, g, links);
}

async function versionView(ns, name, version) {
  const ref = `${ns}/${name}:${version}`;
  const path = `v1/adapters/${encodeURIComponent(ns)}/${encodeURIComponent(`${name}:${version}`)}`;
  const v = await api(path);
  let job = null, file = null;
  if (v.lineage.job_id) job = await api(`v1/fine_tuning/jobs/${encodeURIComponent(v.lineage.job_id)}`).catch(() => null);
  const fileId = (v.lineage.hyperparameters && v.lineage.hyperparameters.data || {}).training_file;
  if (fileId) file = await api(`v1/files/${encodeURIComponent(fileId)}`).catch(() => null);
  const gates = (await api(`v1/adapters/${encodeURIComponent(ns)}/${encodeURIComponent(name)}/gates`)).gates;
  const siblings = (await allPages(`v1/adapters?namespace=${encodeURIComponent(ns)}&limit=100`)).filter((x) => x.name === name);

  const aliasInput = el("input", { id: "alias", value: "production" });
  const force = el("input", { id: "force", type: "checkbox" });
  const verdictBox = el("div", { id: "gate-verdict" });
  const actionBox = el("div", { id: "promote-result" });
  const check = async () => {
    try {
      const g = await api(`${path}/gate?alias=${encodeURIComponent(aliasInput.value.trim())}`);
      fill(verdictBox, 
        el("div", { class: g.passed ? "pass" : "fail", "data-passed": String(g.passed),
          text: g.results.length ? (g.passed ? "gate passes" : "gate fails") : "no gate on this alias" }),
        g.results.map((r) => el("div", { class: `gate-result ${r.passed ? "pass" : "fail"}`, text: `${r.passed ? "✓" : "✗"} ${r.message}` })));
    } catch (err) { fill(verdictBox, errorBox(err)); }
  };
  aliasInput.addEventListener("input", check);
  const act = (label, run) => async () => {
    fill(actionBox);
    try { await run(); fill(actionBox, el("div", { class: "pass", text: `${label}: done` })); await rerender(); }
    catch (err) { fill(actionBox, errorBox(err)); }
  };
  const promote = el("button", { class: "primary", id: "promote", text: "Promote", onclick: act("promote", () =>
    api(`${path}/promote`, { method: "POST", body: { alias: aliasInput.value.trim(), force: force.checked } })) });
  const rollback = el("button", { id: "rollback", text: "Roll back alias", onclick: act("roll back", () =>
    api(`v1/adapters/${encodeURIComponent(ns)}/${encodeURIComponent(name)}/aliases/${encodeURIComponent(aliasInput.value.trim())}/rollback`,
      { method: "POST", body: { force: force.checked } })) });
  const admin = me && me.scope === "admin";

  const compareSel = el("select", { id: "compare" }, el("option", { value: "", text: "compare with…" }),
    siblings.filter((s) => s.version !== v.version).map((s) => el("option", { value: String(s.version), text: `v${s.version}` })));
  const compareBox = el("div", { id: "compare-box" });
  compareSel.addEventListener("change", async () => {
    fill(compareBox);
    const other = siblings.find((s) => String(s.version) === compareSel.value);
    if (other) await compare(v, other, compareBox);
  });

  const rerender = () => versionView(ns, name, version);
  fill(main, 
    el("h1", { text: ref }),
    el("div", { class: "grid" },
      el("div", { class: "card" },
        el("div", {}, "state ", stateCell(v.state)),
        el("div", { text: `aliases: ${v.aliases.map((a) => `@${a}`).join(" ") || "-"}` }),
        el("div", { text: `tags: ${v.tags.join(", ") || "-"}` }),
        el("div", { text: `${v.lora.method} r=${v.lora.r} alpha=${v.lora.alpha} targets=${v.lora.target_modules}` }),
        el("div", { class: "muted", text: `created ${when(v.created_at)} by ${v.lineage.created_by || "-"}` }),
        el("h2", { text: "Gates" }),
        Object.keys(gates).length ? Object.entries(gates).map(([a, rules]) => el("div", { class: "gate-rules", text: `@${a}: ${rules.join(" and ")}` }))
          : el("div", { class: "muted", text: "no gated aliases" })),
      el("div", { class: "card" },
        el("h2", { text: "Promote" }),
        el("div", {}, "alias ", aliasInput, " ", promote, " ", rollback),
        admin ? el("label", {}, force, " force past a failing gate (admin; recorded)") : null,
        verdictBox, actionBox)),
    el("div", { class: "card" }, el("h2", { text: "Lineage" }), lineage(v, job, file)),
    el("div", { class: "card" }, el("h2", { text: "Metrics" }),
      table(["metric", "value"], Object.entries(v.metrics || {}).sort()
        .filter(([, x]) => typeof x !== "object").map(([k, x]) => el("tr", {}, el("td", { text: k }), el("td", { text: typeof x === "number" ? num(x, 6) : x }))))),
    el("div", { class: "card" }, el("h2", { text: "Compare" }), compareSel, compareBox));
  await check();
}

async function compare(a, b, box) {
  const eventsOf = async (v) => (v.lineage.job_id ? jobEvents(v.lineage.job_id).catch(() => []) : []);
  const [ea, eb] = await Promise.all([eventsOf(a), eventsOf(b)]);
  const ca = curves(ea), cb = curves(eb);
  const keys = [...new Set([...Object.keys(a.metrics || {}), ...Object.keys(b.metrics || {})])]
    .filter((k) => typeof (a.metrics || {})[k] === "number" || typeof (b.metrics || {})[k] === "number").sort();
  const chartBox = el("div", { class: "chart", id: "compare-chart", "data-points": "0" });
  fill(box, 
    table(["metric", `v${a.version}`, `v${b.version}`],
      keys.map((k) => el("tr", {}, el("td", { text: k }), el("td", { text: num(a.metrics[k], 6) }), el("td", { text: num(b.metrics[k], 6) })))),
    chartBox);
  const chart = lineChart(chartBox, [`v${a.version} loss`, `v${b.version} loss`, `v${a.version} eval`, `v${b.version} eval`]);
  chart.update(align([ca.loss, cb.loss, ca.evalLoss, cb.evalLoss]));
}

async function servingView() {
  const [serving, use, perMinute, idle] = await Promise.all([
    api("v1/serving"), api("v1/usage?since=30d"), api("v1/usage?since=12h&group=minute"),
    api("v1/adapters/idle?days=30"),
  ]);
  const chartBox = el("div", { class: "chart", id: "usage-chart", "data-points": "0" });
  fill(main, 
    el("h1", { text: "Serving" }),
    el("div", { class: "card" }, el("h2", { text: `Replicas (${serving.replicas.length})` }),
      serving.replicas.length ? table(["replica", "base", "device slots", "host memory", "adapter loads (ms)", "queue", "seen"],
        serving.replicas.map((r) => el("tr", { "data-replica": r.id },
          el("td", { text: short(r.id, 16) }), el("td", { text: r.base }),
          el("td", { text: `${r.tiers.device.join(", ") || "-"} (${r.tiers.device_slots ?? "?"} slots)` }),
          el("td", { text: r.tiers.host.join(", ") || "-" }),
          el("td", { text: r.load_ms.count ? `p50 ${num(r.load_ms.p50, 3)} · p95 ${num(r.load_ms.p95, 3)} · n ${r.load_ms.count}` : "-" }),
          el("td", { text: `${r.queue.running ?? 0} running, ${r.queue.waiting ?? 0} waiting` }),
          el("td", { text: new Date(r.updated_at * 1000).toLocaleTimeString() }))))
        : el("p", { class: "muted", text: "No serving replica reported in the last minute." })),
    el("div", { class: "card" }, el("h2", { text: "Usage (30 days)" }),
      table(["namespace", "model", "requests", "prompt tokens", "completion tokens", "total"],
        use.data.map((u) => el("tr", { "data-model": u.model },
          el("td", { text: u.namespace || "(admin)" }), el("td", { text: u.model }),
          el("td", { class: "requests", text: u.requests }), el("td", { text: u.prompt_tokens }),
          el("td", { text: u.completion_tokens }), el("td", { text: u.total_tokens })))),
      el("h2", { text: "Requests per minute (12 h)" }), chartBox),
    el("div", { class: "card" }, el("h2", { text: "Idle for 30 days" }),
      idle.data.length ? table(["version", "aliases", "last used"], idle.data.map((i) => el("tr", {},
        el("td", { text: i.adapter.id }), el("td", { text: i.adapter.aliases.join(", ") || "-" }),
        el("td", { text: i.last_used_at ? when(i.last_used_at) : "never" }))))
        : el("p", { class: "muted", text: "None." })));
  const byMinute = new Map();
  for (const u of perMinute.data) byMinute.set(u.minute, (byMinute.get(u.minute) || 0) + u.requests);
  const chart = lineChart(chartBox, ["requests"], null);
  const xs = [...byMinute.keys()].sort((p, q) => p - q);
  chart.update([xs.map((x) => (x - (xs[0] || 0)) / 60), xs.map((x) => byMinute.get(x))]);
}

// -- routing -------------------------------------------------------------------------------------
async function render() {
  for (const stop of teardown.splice(0)) { try { stop(); } catch (_) { /* already gone */ } }
  if (!token()) { signin(); return; }
  if (!me) {
    try { await whoami(); } catch (err) { signin(err.message); return; }
  }
  const parts = (location.hash.replace(/^#\/?/, "") || "jobs").split("/").map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === parts[0]);
  fill(main, el("p", { class: "muted", text: "loading…" }));
  try {
    if (parts[0] === "jobs" && parts[1]) await jobView(parts[1]);
    else if (parts[0] === "adapters" && parts.length === 4) await versionView(parts[1], parts[2], parts[3]);
    else if (parts[0] === "adapters") await adaptersView();
    else if (parts[0] === "serving") await servingView();
    else await jobsView();
  } catch (err) {
    if (err.status === 401) { me = null; signin(err.message); return; }
    fill(main, errorBox(err));
  }
}

document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  location.hash = "";
  render();
});
window.addEventListener("hashchange", render);
render();
