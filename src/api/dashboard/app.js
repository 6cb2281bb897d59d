// egret dashboard: reads /api/v1/*, listens to /api/v1/stream (Server-Sent
// Events). Every value from an event is written with textContent, never as
// HTML: destination names and command lines come from whoever was blocked.
"use strict";

const COLORS = {
  "blocked": "#c0392b",
  "would-block": "#d68910",
  "dns-refused": "#7d3c98",
  "dns-would-refuse": "#a569bd",
  "proxy-denied": "#1f618d",
  "allowed-new": "#1e8449",
  "name-new": "#117a65",
  "proxy-new": "#148f77",
};
const FEED_ROWS = 200;
// What the allow rules let through for the first time ([novelty]): listed
// apart, with when it was first seen and the rule that allowed it.
const FIRST_SEEN = ["allowed-new", "name-new", "proxy-new"];
const FIRST_SEEN_ROWS = 50;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const feedRows = new Map(); // event.id -> <tr>
let liveEvents = 0;
let lastHeartbeat = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function get(path) {
  const r = await fetch(path, { headers: { accept: "application/json" } });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function later(fn, ms) {
  let timer = null;
  return () => {
    if (timer === null) timer = setTimeout(() => { timer = null; fn(); }, ms);
  };
}

function time(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  return isNaN(d) ? ts : d.toLocaleString();
}

function who(d) {
  const p = d.process || {};
  const user = (d.user && (d.user.name || d.user.id)) || null;
  if (p.name || p.executable) {
    return (p.name || p.executable) + (p.pid ? " (" + p.pid + ")" : "") + (user ? ", " + user : "");
  }
  if (d.egret && d.egret.unit) return "unit " + d.egret.unit;
  if (user) return "user " + user;
  if (d.source && d.source.ip) return d.source.ip;
  return "egret";
}

function destination(d) {
  if (d.dns && d.dns.question) return d.dns.question.name + " (DNS " + d.dns.question.type + ")";
  const t = d.destination || {};
  let s = t.domain ? t.domain + (t.ip && t.ip !== t.domain ? " [" + t.ip + "]" : "") : (t.ip || "");
  if (t.port !== undefined) s += ":" + t.port;
  if (d.network && d.network.transport) s += "/" + d.network.transport;
  return s || (d.message || "");
}

function upsertIncident(d, fresh) {
  const id = d.event && d.event.id;
  if (!id) return;
  const action = (d.event && d.event.action) || "?";
  const tr = el("tr");
  tr.dataset.id = id;
  tr.dataset.action = action;
  tr.hidden = !shown(action);
  tr.title = d.message || "";
  addFilterOption(action);
  tr.append(
    el("td", time((d.egret && d.egret.last_seen) || d["@timestamp"])),
    (() => {
      const sev = (d.egret && d.egret.severity) || "";
      const td = el("td");
      if (sev) td.append(el("span", sev, "sev s-" + sev));
      return td;
    })(),
    (() => { const td = el("td"); td.append(el("span", action, "action a-" + action)); return td; })(),
    el("td", (d.egret && d.egret.count) || 1, "num"),
    Object.assign(el("td", who(d)), { title: who(d) }),
    Object.assign(el("td", destination(d)), { title: destination(d) }),
    el("td", (d.rule && d.rule.name) || ""),
  );
  const body = $("feed").tBodies[0];
  const old = feedRows.get(id);
  if (old) old.remove();
  if (fresh) tr.className = "fresh";
  if (fresh || !old) body.prepend(tr); else body.append(tr);
  feedRows.set(id, tr);
  while (body.rows.length > FEED_ROWS) {
    const last = body.rows[body.rows.length - 1];
    feedRows.delete(last.dataset.id);
    last.remove();
  }
  $("feed-empty").hidden = body.rows.length > 0;
  $("feed-count").textContent = "(" + body.rows.length + " shown, " + liveEvents + " pushed live)";
}

function shown(action) {
  const want = $("feed-filter").value;
  return !want || want === action;
}

function addFilterOption(action) {
  const select = $("feed-filter");
  if ([...select.options].some((o) => o.value === action)) return;
  select.append(Object.assign(el("option", action), { value: action }));
}

function applyFilter() {
  for (const tr of $("feed").tBodies[0].rows) tr.hidden = !shown(tr.dataset.action);
}

function firstSeen(d) {
  return (d.egret && d.egret.first_seen) || d["@timestamp"] || "";
}

function fillTable(id, rows, cells) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr");
    for (const [text, cls] of cells(r)) {
      const td = el("td", text, cls);
      td.title = String(text);
      tr.append(td);
    }
    return tr;
  }));
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", "nothing yet", "muted");
    td.colSpan = $(id).tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
  }
}

function drawTimeline(t) {
  const svg = $("timeline");
  const W = 720, H = 140, top = 14, bottom = 16;
  const actions = Object.keys(t.series).sort();
  const n = actions.length ? t.series[actions[0]].length : 60;
  const totals = Array.from({ length: n }, (_, i) => actions.reduce((s, a) => s + t.series[a][i], 0));
  const max = Math.max(1, ...totals);
  const bw = W / n;
  const nodes = [];
  const text = (x, y, s, anchor) => {
    const e = document.createElementNS(SVG, "text");
    e.setAttribute("x", x); e.setAttribute("y", y);
    e.setAttribute("font-size", "10"); e.setAttribute("fill", "#6b7380");
    e.setAttribute("text-anchor", anchor);
    e.textContent = s;
    return e;
  };
  for (let i = 0; i < n; i++) {
    let y = H - bottom;
    for (const a of actions) {
      const v = t.series[a][i];
      if (!v) continue;
      const h = (v / max) * (H - top - bottom);
      y -= h;
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", (i * bw + 1).toFixed(1));
      r.setAttribute("y", y.toFixed(1));
      r.setAttribute("width", Math.max(1, bw - 2).toFixed(1));
      r.setAttribute("height", Math.max(0.5, h).toFixed(1));
      r.setAttribute("fill", COLORS[a] || "#566573");
      r.setAttribute("class", "bar");
      const tip = document.createElementNS(SVG, "title");
      tip.textContent = new Date((t.start + i * t.step) * 1000).toLocaleTimeString() + " " + a + ": " + v;
      r.append(tip);
      nodes.push(r);
    }
  }
  const axis = document.createElementNS(SVG, "line");
  axis.setAttribute("x1", 0); axis.setAttribute("x2", W);
  axis.setAttribute("y1", H - bottom); axis.setAttribute("y2", H - bottom);
  axis.setAttribute("stroke", "#dde1e6");
  nodes.push(axis, text(2, 10, "max " + max + "/min", "start"),
    text(2, H - 3, "−" + (n - 1) + " min", "start"), text(W - 2, H - 3, "now", "end"));
  svg.replaceChildren(...nodes);
  $("legend").replaceChildren(...actions.map((a) => {
    const s = el("span", a);
    const i = el("i");
    i.style.background = COLORS[a] || "#566573";
    s.prepend(i);
    return s;
  }));
  svg.dataset.total = totals.reduce((s, v) => s + v, 0);
}

function pill(id, text, state) {
  const p = $(id);
  p.textContent = text;
  p.className = "pill " + state;
}

function showStatus(s) {
  pill("pill-table", s.loaded ? "table: " + (s.mode || "?") : "table: NOT LOADED", s.loaded ? "ok" : "bad");
  const m = s.monitor || {};
  pill("pill-daemon", m.running ? "daemon: running" : "daemon: NOT running", m.running ? "ok" : "bad");
  const lost = m.lost || 0;
  pill("pill-lost", "lost events: " + lost, lost ? "warn" : "ok");
  fillTable("rules", s.rules || [], (r) => [[r.packets, "num"], [r.action], [r.rule]]);
  const loss = m.loss || {};
  const items = [
    // The books' count spans ruleset swaps and tamper restores, as "received" does;
    // the live table's counters restart with each new table.
    ["blocked packets (kernel)", loss.kernel_logged !== undefined ? loss.kernel_logged : s.blocked_packets],
    ["received by egret", loss.received],
    ["lost", lost + " (gaps " + (loss.seq_lost || 0) + ", overruns " + (loss.enobufs || 0) + ", while down " + (loss.while_down || 0) + ")"],
    ["books updated", time(m.updated_at)],
    ["last heartbeat", lastHeartbeat ? time(lastHeartbeat) : "none seen (set heartbeat = \"5m\")"],
  ];
  if (m.dns_guard) items.push(["DNS guard", m.dns_guard.queries + " queries, " + m.dns_guard.refused + " refused"]);
  if (m.proxy) items.push(["proxy", m.proxy.requests + " requests, " + m.proxy.denied + " denied"]);
  if (s.api && s.api.host) $("host").textContent = "— " + s.api.host;
  if (s.api) items.push(["egret", s.api.version + ", up since " + time(s.api.started)]);
  $("pipeline").replaceChildren(...items.flatMap(([k, v]) => [el("dt", k), el("dd", v === undefined ? "?" : v)]));
}

const refreshTimeline = later(() => get("api/v1/timeline?since=1h").then(drawTimeline).catch(report), 1000);
const refreshTop = later(() => {
  get("api/v1/top?by=process&since=24h").then((r) => fillTable("top-process", r.top, (x) => [[x.packets, "num"], [x.incidents, "num"], [x.label]])).catch(report);
  get("api/v1/top?by=destination&since=24h").then((r) => fillTable("top-destination", r.top, (x) => [[x.packets, "num"], [x.incidents, "num"], [x.label]])).catch(report);
}, 1000);
const refreshFirstSeen = later(() => {
  Promise.all(FIRST_SEEN.map((a) => get("api/v1/events?since=24h&limit=" + FIRST_SEEN_ROWS + "&action=" + a)))
    .then((answers) => {
      const rows = answers.flatMap((r) => r.events)
        .sort((x, y) => firstSeen(y).localeCompare(firstSeen(x)))
        .slice(0, FIRST_SEEN_ROWS);
      fillTable("first-seen", rows, (d) => [
        [time(firstSeen(d))],
        [(d.egret && d.egret.severity) || "", "sev s-" + ((d.egret && d.egret.severity) || "")],
        [(d.event && d.event.action) || ""],
        [who(d)],
        [destination(d)],
        [(d.rule && d.rule.name) || ""],
      ]);
    })
    .catch(report);
}, 1000);
const refreshStatus = later(() => get("api/v1/status").then(showStatus).catch(report), 500);

function report(e) {
  console.error(e);
  pill("pill-table", "API: " + e.message, "bad");
}

function onEvent(d) {
  const action = d.event && d.event.action;
  if (action === "heartbeat") {
    lastHeartbeat = d["@timestamp"];
    refreshStatus();
    return;
  }
  upsertIncident(d, true);
  if (FIRST_SEEN.includes(action)) refreshFirstSeen();
  refreshTimeline();
  refreshTop();
  refreshStatus();
}

function connect() {
  const es = new EventSource("api/v1/stream");
  es.onopen = () => { pill("pill-feed", "live: on", "ok"); document.body.dataset.live = "open"; };
  es.onerror = () => { pill("pill-feed", "live: reconnecting", "warn"); document.body.dataset.live = "retrying"; };
  es.onmessage = (m) => {
    let d;
    try { d = JSON.parse(m.data); } catch (e) { return; }
    liveEvents += 1;
    document.body.dataset.pushed = liveEvents;
    onEvent(d);
  };
  es.addEventListener("lagged", (m) => console.warn("live feed skipped " + m.data + " events"));
}

async function start() {
  try {
    const r = await get("api/v1/events?since=24h&limit=" + FEED_ROWS);
    for (const d of r.events) {
      if (d.event && d.event.action === "heartbeat") {
        if (!lastHeartbeat) lastHeartbeat = d["@timestamp"];
        continue;
      }
      upsertIncident(d, false);
    }
    $("feed-empty").hidden = $("feed").tBodies[0].rows.length > 0;
  } catch (e) { report(e); }
  $("feed-filter").addEventListener("change", applyFilter);
  refreshTimeline(); refreshTop(); refreshStatus(); refreshFirstSeen();
  connect();
  setInterval(() => { refreshTimeline(); refreshTop(); refreshStatus(); refreshFirstSeen(); }, 15000);
  document.body.dataset.ready = "1";
}

start();
