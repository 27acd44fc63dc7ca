// imageswarm dashboard: the controller's REST API and event stream, rendered for a wall screen.
//
// Reads are open; the event stream and every change need the operator token, which the page
// sends as `Authorization: Bearer ...`. EventSource cannot send headers, so the stream is read
// with fetch(): the token never goes into a URL, a log line or a Referer. Events re-fetch what
// they change (debounced); `node.progress` is merged in place. A dropped stream reconnects with
// exponential backoff and `?since=<last id>`, then re-fetches everything.
"use strict";

const TOKEN_KEY = "imageswarm.token";
const ACTIVE = new Set(["pending", "prefetching", "applying", "paused", "rolling-back"]);
const CAN = {
  pause: (s) => s === "prefetching" || s === "applying",
  resume: (s) => s === "paused" || s === "halted",
  abort: (s) => !["done", "aborted", "rolled-back"].includes(s),
};
const CONFIRM = new Set(["abort"]); // asks for a second click within CONFIRM_MS
const CONFIRM_MS = 4000;
// Rollout progress bars, left to right; what is not drawn (pending) stays empty.
const BAR_ORDER = [
  "applied",
  "prefetched",
  "applying",
  "prefetching",
  "rolling-back",
  "rolled-back",
  "failed",
];
const SOURCES = { controller: "ctl", peers: "peers", local: "local", web_seed: "web", unattributed: "?" };
const STALE_MS = 45000; // the controller sends a keepalive every 15 s
const MAX_EVENTS = 200;
const SHOWN_FINISHED = 6;

const state = {
  token: null,
  nodes: [],
  images: [],
  rollouts: [],
  events: [],
  lastSeq: null,
  lastEventAt: null,
};
const live = { abort: null, retries: 0, timer: null, lastData: 0, stale: false };
const loads = new Map(); // resource -> pending timer
const generation = { nodes: 0, images: 0, rollouts: 0 };
const armed = new Map(); // "r-1:abort" -> expiry (ms)
const $ = (sel) => document.querySelector(sel);

// ---------------------------------------------------------------- formatting

const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

const when = (iso) => `<time data-ts="${esc(iso)}" title="${esc(iso)}"></time>`;
const NONE = `<span class="dim">—</span>`;
const badge = (s, text) => `<span class="badge" data-s="${esc(s)}">${esc(text ?? s)}</span>`;

function imageLabel(id) {
  if (!id) return NONE;
  const image = state.images.find((i) => i.image_id === id);
  const name = image ? `${esc(image.name)} ` : "";
  return `${name}<span class="mono dim" title="${esc(id)}">${esc(id.slice(0, 8))}</span>`;
}

// parts: [[status, count], ...] drawn in order as shares of total (widths set in setHTML).
function bar(parts, total) {
  const cells = parts
    .filter(([, n]) => n > 0)
    .map(([s, n]) => `<i data-s="${esc(s)}" data-w="${(100 * n) / total}"></i>`);
  return `<div class="bar">${cells.join("")}</div>`;
}

function setHTML(el, html) {
  if (el.dataset.html === html) return; // unchanged: keep the DOM (and a half-done click) as is
  el.innerHTML = html;
  el.dataset.html = html;
  for (const i of el.querySelectorAll("[data-w]")) i.style.width = `${i.dataset.w}%`; // CSSOM: CSP allows it
  tick();
}

// ---------------------------------------------------------------- rendering

function renderSummary() {
  const online = state.nodes.filter((n) => n.online).length;
  const active = state.rollouts.filter((r) => ACTIVE.has(r.state)).length;
  const last = state.lastEventAt ? ` · last event <b>${when(state.lastEventAt)}</b>` : "";
  setHTML(
    $("#summary"),
    `nodes <b>${online}/${state.nodes.length}</b> online · images <b>${state.images.length}</b>` +
      ` · rollouts <b>${active}</b> active${last}`,
  );
}

function fetchCell(node) {
  const entries = Object.entries(node.fetches || {});
  if (!entries.length) return [NONE, ""];
  // A fetch not yet done first, and the image its rollout asks for before others.
  const target = state.rollouts.find((r) => r.id === node.rollout)?.image_id;
  const rank = ([id, f]) => (f.state === "done" ? 2 : 0) + (id === target ? 0 : 1);
  entries.sort((a, b) => rank(a) - rank(b));
  const [id, f] = entries[0];
  const pct = f.total_bytes ? Math.floor((100 * f.done_bytes) / f.total_bytes) : 0;
  const error = f.error ? ` — ${f.error}` : "";
  const title = `${id}: ${f.state} ${bytes(f.done_bytes)} of ${bytes(f.total_bytes)}${error}`;
  const progress = badge(f.state, f.state === "done" ? "done" : `${pct}%`);
  const head = `<div class="fetch" title="${esc(title)}">${imageLabel(id)} ${bar([[f.state, pct]], 100)}${progress}</div>`;
  const by = f.bytes_by_source || {};
  const sources = Object.entries(SOURCES)
    .filter(([k]) => by[k])
    .map(([k, short]) => `${short} ${bytes(by[k])}`);
  return [head, sources.length ? `<span class="mono">${esc(sources.join(" · "))}</span>` : NONE];
}

function applyCell(node) {
  const pending = node.agent?.pending;
  if (pending) return badge("running", `${pending.kind} ${pending.phase ?? ""}`.trim());
  const a = node.action;
  if (a && a.status === "running") return badge("running", a.detail || a.id);
  return NONE;
}

function resultCell(node) {
  const last = node.agent?.last;
  if (last) {
    const title = last.error ? ` title="${esc(last.error)}"` : "";
    return `<span${title}>${badge(last.result, `${last.kind} ${last.result}`)} ${imageLabel(last.image_id)}</span>`;
  }
  const a = node.action;
  if (a && a.status !== "running")
    return badge(a.status === "done" ? "done" : "failed", a.detail || `${a.id} ${a.status}`);
  return NONE;
}

function renderFleet() {
  const rows = state.nodes.map((n) => {
    const labels = Object.entries(n.labels || {})
      .map(([k, v]) => `<span class="chip">${esc(k)}=${esc(v)}</span>`)
      .join("");
    const [fetch, sources] = fetchCell(n);
    const status = n.online ? "online" : "offline";
    return (
      `<tr class="${status}" data-node="${esc(n.name)}">` +
      `<td><b>${esc(n.name)}</b></td><td><span class="dot" data-s="${status}">${status}</span></td>` +
      `<td>${imageLabel(n.current_image)}</td><td>${imageLabel(n.previous_image)}</td>` +
      `<td class="wrap">${labels}</td><td>${fetch}</td><td>${sources}</td><td>${applyCell(n)}</td>` +
      `<td>${resultCell(n)}</td><td class="mono">${esc(n.rollout ?? "")}</td><td>${when(n.last_seen)}</td></tr>`
    );
  });
  setHTML(
    $("#fleet tbody"),
    rows.join("") || `<tr><td colspan="11" class="empty">no node has enrolled</td></tr>`,
  );
  $("#fleet-count").textContent = `${state.nodes.length} nodes`;
}

function renderImages() {
  const rows = state.images.map((i) => {
    const running = state.nodes.filter((n) => n.current_image === i.image_id).length;
    return (
      `<tr data-image="${esc(i.image_id)}"><td><b>${esc(i.name)}</b></td><td class="mono">${esc(i.image_id)}</td>` +
      `<td>${bytes(i.size)}</td><td>${bytes(i.stored_bytes)}</td><td>${esc(i.chunk_count)}</td>` +
      `<td>${running}</td><td>${when(i.created)}</td></tr>`
    );
  });
  setHTML(
    $("#images tbody"),
    rows.join("") || `<tr><td colspan="7" class="empty">no image is published</td></tr>`,
  );
  $("#images-count").textContent = `${state.images.length}`;
}

function button(r, verb) {
  const key = `${r.id}:${verb}`;
  const isArmed = (armed.get(key) ?? 0) > Date.now();
  const cls = CONFIRM.has(verb) ? (isArmed ? "danger armed" : "danger") : "";
  const label = isArmed ? `confirm ${verb}?` : verb;
  const disabled = CAN[verb](r.state) ? "" : " disabled";
  return `<button type="button" class="${cls}" data-verb="${verb}" data-id="${esc(r.id)}"${disabled}>${label}</button>`;
}

function strategy(s) {
  const parts = [
    `canary ${s.canary}`,
    `batch ${s.batch}`,
    `max failures ${s.max_failures}`,
    `reboot ${s.reboot}`,
  ];
  if (s.prefetch) parts.unshift("prefetch");
  if (s.health) parts.push(`health ${s.health.command ?? s.health.url}`);
  return parts.join(", ");
}

const actionable = (r) => ACTIVE.has(r.state) || r.state === "halted"; // the buttons still apply

function rolloutCard(r) {
  const counts = r.counts || {};
  const batch = r.batches ? `batch ${Math.min(r.batch + 1, r.batches)} of ${r.batches}` : "no batches";
  const buttons = actionable(r) ? ["pause", "resume", "abort"].map((v) => button(r, v)) : [];
  const head = [
    `<span class="rid">${esc(r.id)}</span>`,
    `<span class="state" data-s="${esc(r.state)}">${esc(r.state)}</span>`,
    `<span class="batch">${batch}</span>`,
    `<span>${imageLabel(r.image_id)}</span><span class="dim">${when(r.updated)}</span>`,
    `<span class="actions">${buttons.join("")}</span>`,
  ];
  const progress = bar(
    BAR_ORDER.map((s) => [s, counts[s] || 0]),
    r.nodes.length || 1,
  );
  const summary = Object.entries(counts)
    .filter(([, n]) => n)
    .map(([s, n]) => `${n} ${s}`);
  const max = r.strategy.max_failures;
  const failed = counts.failed ? ` · <span data-s="failed">${counts.failed} failed</span> (max ${max})` : "";
  const nodes = r.nodes.map(
    (n) =>
      `<span class="chip" data-node="${esc(n.name)}" title="${esc(n.detail ?? "")}">${esc(n.name)} ` +
      `<span data-s="${esc(n.status)}">${esc(n.status)}</span></span>`,
  );
  const cls = actionable(r) ? "active" : "done";
  return (
    `<div class="rollout ${cls}" data-rollout="${esc(r.id)}" data-state="${esc(r.state)}">` +
    `<div class="head">${head.join("")}</div>` +
    progress +
    `<div>${esc(summary.join(" · "))}${failed}<span class="dim strategy">${esc(strategy(r.strategy))}</span></div>` +
    (r.reason ? `<div class="reason">${esc(r.reason)}</div>` : "") +
    `<div class="nodes">${nodes.join("")}</div></div>`
  );
}

function renderRollouts() {
  const newest = (a, b) => actionable(b) - actionable(a) || (b.created > a.created ? 1 : -1);
  const sorted = [...state.rollouts].sort(newest);
  const shown = sorted.filter((r, i) => actionable(r) || i < SHOWN_FINISHED);
  setHTML($("#rollouts"), shown.map(rolloutCard).join("") || `<p class="empty">no rollouts</p>`);
  const active = state.rollouts.filter((r) => ACTIVE.has(r.state)).length;
  $("#rollouts-count").textContent = `${active} active, ${state.rollouts.length} in all`;
}

function describe(kind, d) {
  switch (kind) {
    case "image.published":
    case "image.deleted":
      return `${d.name ?? ""} ${d.image_id}`;
    case "node.enrolled":
      return [d.node, ...Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`)].join(" ");
    case "node.online":
    case "node.offline":
      return d.node;
    case "rollout.created":
      return `${d.id} image ${d.image_id}, ${d.targets ?? "?"} nodes in ${d.batches ?? "?"} batches`;
    case "rollout.state":
      return `${d.id} ${d.state}, batch ${d.batch + 1}${d.reason ? ` — ${d.reason}` : ""}`;
    case "rollout.node":
      return `${d.id} ${d.node} ${d.status}${d.detail ? ` — ${d.detail}` : ""}`;
    default:
      return JSON.stringify(d);
  }
}

function renderEvents() {
  const items = state.events.map(
    (e) =>
      `<li data-kind="${esc(e.kind)}"><span class="t">${esc(e.time)}</span>` +
      `<span class="k" data-s="${esc(e.data.state || e.data.status || e.kind.split(".")[1])}">${esc(e.kind)}</span>` +
      `${esc(describe(e.kind, e.data))}</li>`,
  );
  setHTML($("#events"), items.join("") || `<li class="dim">waiting for events…</li>`);
}

let renderTimer = null;
function render() {
  clearTimeout(renderTimer);
  renderTimer = null;
  renderSummary();
  renderRollouts();
  renderFleet();
  renderImages();
  renderEvents();
}
function renderSoon() {
  renderTimer ??= setTimeout(render, 100);
}

function tick() {
  for (const el of document.querySelectorAll("time[data-ts]")) el.textContent = ago(el.dataset.ts);
}

// ---------------------------------------------------------------- the REST API

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function problem(resp) {
  try {
    const body = await resp.json();
    return new ApiError(resp.status, body.detail || body.title || resp.statusText);
  } catch {
    return new ApiError(resp.status, resp.statusText || `HTTP ${resp.status}`);
  }
}

const authHeaders = () => (state.token ? { Authorization: `Bearer ${state.token}` } : {});

async function api(method, path) {
  const resp = await fetch(path, { method, headers: authHeaders(), cache: "no-store" });
  if (!resp.ok) throw await problem(resp);
  return resp.status === 204 ? null : resp.json();
}

function refresh(...resources) {
  for (const name of resources) {
    if (loads.has(name)) continue;
    const timer = setTimeout(() => load(name), 150);
    loads.set(name, timer);
  }
}

async function load(name) {
  loads.delete(name);
  const mine = ++generation[name];
  try {
    const body = await api("GET", `/api/v1/${name}`);
    if (mine !== generation[name]) return; // a newer answer is on its way
    state[name] = body[name];
    if (name === "nodes") state.nodes.sort((a, b) => a.name.localeCompare(b.name));
    renderSoon();
  } catch (err) {
    toast(`could not load ${name}: ${err.message}`);
  }
}

async function act(verb, id) {
  const key = `${id}:${verb}`;
  if (CONFIRM.has(verb) && !((armed.get(key) ?? 0) > Date.now())) {
    armed.set(key, Date.now() + CONFIRM_MS);
    setTimeout(renderRollouts, CONFIRM_MS + 50);
    renderRollouts();
    return;
  }
  armed.delete(key);
  try {
    const rollout = await api("POST", `/api/v1/rollouts/${encodeURIComponent(id)}/${verb}`);
    state.rollouts = state.rollouts.map((r) => (r.id === rollout.id ? rollout : r));
    render();
  } catch (err) {
    if (err.status === 401) return rejected(err.message);
    toast(`${verb} ${id}: ${err.message}`);
  }
}

let toastTimer = null;
function toast(text) {
  const el = $("#toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    el.hidden = true;
  }, 8000);
}

// ---------------------------------------------------------------- the event stream

function setConn(s, text) {
  const el = $("#conn");
  el.dataset.state = s;
  el.textContent = text;
}

function onEvent(kind, id, data) {
  if (Number.isInteger(id)) state.lastSeq = id;
  state.lastEventAt = new Date().toISOString();
  if (kind === "node.progress") {
    const node = state.nodes.find((n) => n.name === data.node);
    if (!node) return refresh("nodes");
    node.fetches = data.fetches ?? node.fetches;
    node.action = data.action ?? node.action;
    node.agent = { ...(node.agent || {}), pending: data.agent?.pending ?? null };
    return renderSoon(); // progress is too frequent for the log
  }
  state.events.unshift({ kind, data, time: new Date().toLocaleTimeString([], { hour12: false }) });
  state.events.length = Math.min(state.events.length, MAX_EVENTS);
  if (kind.startsWith("image.")) refresh("images", "nodes");
  else if (kind.startsWith("node.")) refresh("nodes");
  else if (kind.startsWith("rollout.")) refresh("rollouts", "nodes");
  renderSoon();
}

function parseBlock(block) {
  let kind = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment: the keepalive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") kind = value;
    else if (field === "id") id = Number(value);
    else if (field === "data") data.push(value);
  }
  if (data.length) onEvent(kind, id, JSON.parse(data.join("\n")));
}

async function readStream(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    live.lastData = Date.now();
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      parseBlock(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
    }
  }
}

async function connect() {
  clearTimeout(live.timer);
  live.abort?.abort();
  const ctl = new AbortController();
  live.abort = ctl;
  live.stale = false;
  setConn("connecting", "connecting…");
  let why;
  try {
    const since = state.lastSeq === null ? "" : `?since=${state.lastSeq}`;
    const resp = await fetch(`/api/v1/events${since}`, {
      headers: authHeaders(),
      cache: "no-store",
      signal: ctl.signal,
    });
    if (resp.status === 401) return rejected((await problem(resp)).message);
    if (!resp.ok) throw await problem(resp);
    live.retries = 0;
    live.lastData = Date.now();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    setConn("live", "live");
    showBoard();
    refresh("images", "nodes", "rollouts"); // after subscribing: nothing falls in between
    await readStream(resp.body);
    why = "the event stream ended";
  } catch (err) {
    if (ctl.signal.aborted && !live.stale) return; // we closed it on purpose
    why = live.stale ? "no data for 45 s" : err.message;
  }
  if (live.abort !== ctl) return;
  const delay = Math.min(30000, 1000 * 2 ** live.retries) * (0.8 + 0.4 * Math.random());
  live.retries++;
  setConn("retrying", `disconnected (${why}); retrying in ${Math.round(delay / 1000)}s`);
  live.timer = setTimeout(connect, delay);
}

function watchdog() {
  if ($("#conn").dataset.state === "live" && Date.now() - live.lastData > STALE_MS) {
    live.stale = true;
    live.abort?.abort();
  }
}

// ---------------------------------------------------------------- token and start

function showBoard() {
  $("#login").hidden = true;
  $("#board").hidden = false;
  $("#signout").hidden = false;
}

function askToken(error) {
  live.abort?.abort();
  live.abort = null;
  clearTimeout(live.timer);
  $("#board").hidden = true;
  $("#signout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = error || "";
  $("#token").value = "";
  $("#token").focus();
}

function rejected(detail) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  setConn("rejected", "token rejected");
  askToken(`The controller rejected this token (401 Unauthorized: ${detail}).`);
}

function start(token) {
  state.token = token;
  state.lastSeq = null;
  $("#login-error").textContent = "";
  connect();
}

function main() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash !== null) history.replaceState(null, "", location.pathname + location.search); // out of sight
  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    start($("#token").value.trim());
  });
  $("#signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    setConn("idle", "not connected");
    askToken("");
  });
  $("#rollouts").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-verb]");
    if (b && !b.disabled) act(b.dataset.verb, b.dataset.id);
  });
  setInterval(tick, 1000);
  setInterval(watchdog, 5000);
  const token = fromHash ?? sessionStorage.getItem(TOKEN_KEY);
  if (token === null) askToken("");
  else start(token);
}

main();
