// The status page: live overview over server-sent events, a trend canvas, login and acknowledge.
// Everything is served by the gateway; nothing is fetched from the internet.
"use strict";

const LEVELS = ["none", "IV blue", "III yellow", "II orange", "I red"];
const $ = (id) => document.getElementById(id);
let chosen = null;   // catalogue index of the point whose trend is shown
let lastData = null;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function ago(ms, now) {
  if (ms == null) return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function fmtBytes(n) {
  if (n == null) return "unknown";
  const units = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function renderAlarms(d) {
  const box = $("alarms");
  box.replaceChildren();
  if (!d.alarms.length) { box.append(el("p", {class: "muted"}, "No alarm rules on this gateway.")); return; }
  for (const a of d.alarms) {
    const flags = el("div", {class: "flags"});
    const state = a.level === 0 ? "normal" : (a.acked ? "acknowledged" : "raised");
    flags.append(el("span", {"data-flag": "state"}, state));
    if (a.latched) flags.append(el("span", {"data-flag": "latched"}, "latched"));
    if (a.fault) flags.append(el("span", {class: "fault", "data-flag": "fault"}, "fault: " + (a.fault_reason || "")));
    const inputs = el("div", {class: "muted"}, a.inputs.map((i) => `${i.point} = ${i.value ?? "—"} ${i.unit || ""}`).join(", "));
    const card = el("div", {class: `alarm level-${a.level}`, "data-rule": a.rule, "data-level": a.level_name, "data-colour": a.colour},
      el("div", {}, el("strong", {}, a.rule), " ", el("span", {class: "level"}, LEVELS[a.level] || a.colour)),
      flags,
      el("div", {class: "muted"}, a.level ? `since ${new Date(a.since_ms).toLocaleString()}` : ""),
      inputs);
    if (a.level > 0 && !a.acked && d.can_acknowledge) {
      card.append(el("button", {class: "ack", "data-rule": a.rule, onclick: () => acknowledge(a.rule)}, d.you ? "Acknowledge" : "Log in to acknowledge"));
    }
    box.append(card);
  }
}

function renderDevices(d) {
  const box = $("devices");
  box.replaceChildren();
  for (const dev of d.devices) {
    const table = el("table", {"data-device": dev.name},
      el("caption", {}, el("strong", {}, dev.name), " on ", dev.bus, " — ",
        el("span", {class: `state ${dev.state}`, "data-state": dev.state}, dev.state), ", last poll ", ago(dev.last_poll_ms, d.now_ms)),
      el("tr", {}, el("th", {}, "point"), el("th", {}, "value"), el("th", {}, "unit"), el("th", {}, "quality"), el("th", {class: "opt"}, "time")));
    for (const p of dev.points) {
      const bad = p.quality && p.quality !== "good";
      table.append(el("tr", {class: "point", "data-point": `${dev.name}.${p.name}`, onclick: () => choose(p.index, `${dev.name}.${p.name}`)},
        el("td", {}, p.name), el("td", {class: "num value"}, p.value == null ? "—" : String(p.value)), el("td", {}, p.unit || ""),
        el("td", {class: "quality" + (bad ? " bad" : "")}, p.quality || "—"),
        el("td", {class: "opt muted"}, p.ts_ms ? new Date(p.ts_ms).toLocaleTimeString() : "")));
    }
    box.append(table);
  }
}

function renderGateway(d) {
  const link = $("link");
  link.textContent = d.uplink.connected ? "uplink connected" : "uplink down";
  link.className = "pill " + (d.uplink.connected ? "up" : "down");
  const s = d.spool;
  const facts = [
    ["site", `${d.site} / ${d.gateway}`], ["software", d.software], ["session", d.session],
    ["uptime", d.uptime_s == null ? "—" : `${Math.round(d.uptime_s / 60)} min`],
    ["uplink", `${d.uplink.connected ? "connected to" : "down, broker"} ${d.uplink.broker || ""}`],
    ["last delivery", ago(d.uplink.last_delivery_ms, d.now_ms)],
    ["spool backlog", s.known ? `${s.backlog_readings} readings, ${s.unsent_messages} messages, ${fmtBytes(s.bytes)}` : "unknown (disk busy)"],
    ["disk free", s.known ? fmtBytes(s.disk_free_bytes) : "unknown"],
    ["readings since start", d.readings],
  ];
  $("gateway-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {"data-fact": k}, String(v))]));
  const faults = Object.entries(d.gateway_faults || {});
  $("faults").replaceChildren(...faults.map(([k, v]) => el("p", {class: "quality bad"}, `fault ${k}: ${v}`)));
  $("site").textContent = d.site; $("gateway").textContent = d.gateway; $("version").textContent = `Yujing ${d.software}`;
  const loginBox = $("login"), logout = $("logout");
  if (!d.can_acknowledge) {
    $("login-state").textContent = "Acknowledging from this page is off on this gateway (no users file).";
    loginBox.hidden = true; logout.hidden = true;
  } else if (d.you) {
    $("login-state").textContent = `Logged in as ${d.you}.`; loginBox.hidden = true; logout.hidden = false;
  } else {
    $("login-state").textContent = "Log in to acknowledge alarms."; loginBox.hidden = false; logout.hidden = true;
  }
}

function render(d) {
  lastData = d;
  renderAlarms(d); renderDevices(d); renderGateway(d);
  if (chosen != null) drawTrend();
}

async function post(path, body) {
  const res = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json", "X-Yujing": "1"},
                                 body: JSON.stringify(body || {}), credentials: "same-origin"});
  let data = {};
  try { data = await res.json(); } catch (e) { data = {message: res.statusText}; }
  return {ok: res.ok && data.ok !== false, data};
}

async function refresh() {
  const res = await fetch("/api/overview", {credentials: "same-origin"});
  if (res.ok) render(await res.json());
}

async function acknowledge(rule) {
  if (!lastData || !lastData.you) { $("message").textContent = "Log in first (below)."; $("login").hidden = false; return; }
  const r = await post("/api/ack", {rule});
  $("message").textContent = r.data.message || (r.ok ? "acknowledged" : "failed");
  await refresh();
}

async function choose(point, name) {
  chosen = point;
  $("trend-name").textContent = name;
  await drawTrend();
}

async function drawTrend() {
  const res = await fetch(`/api/trend/${chosen}`);
  if (!res.ok) return;
  const {series} = await res.json();
  const c = $("trend"), g = c.getContext("2d");
  const w = c.width = c.clientWidth || 800, h = c.height = 220;
  g.clearRect(0, 0, w, h);
  if (series.length < 2) { g.fillStyle = "#757575"; g.fillText("not enough readings yet", 10, 20); return; }
  const ts = series.map((s) => s[0]);
  const t0 = Math.min(...ts), t1 = Math.max(...ts);
  let v0 = Math.min(...series.map((s) => s[1])), v1 = Math.max(...series.map((s) => s[2]));
  if (v0 === v1) { v0 -= 1; v1 += 1; }
  const x = (t) => 50 + (w - 60) * (t - t0) / Math.max(t1 - t0, 1), y = (v) => h - 20 - (h - 40) * (v - v0) / (v1 - v0);
  g.strokeStyle = "#eee"; g.fillStyle = "#757575"; g.font = "12px system-ui";
  for (const v of [v0, (v0 + v1) / 2, v1]) { g.beginPath(); g.moveTo(50, y(v)); g.lineTo(w - 10, y(v)); g.stroke(); g.fillText(v.toPrecision(4), 2, y(v) + 4); }
  g.fillText(new Date(t0 * 1000).toLocaleTimeString(), 50, h - 4);
  g.fillText(new Date(t1 * 1000).toLocaleTimeString(), w - 90, h - 4);
  // each step's lowest and highest reading: a band, so a short spike stays visible
  g.strokeStyle = "#1565c0"; g.lineWidth = 2;
  for (const k of [1, 2]) {
    g.beginPath();
    series.forEach((s, i) => (i ? g.lineTo(x(s[0]), y(s[k])) : g.moveTo(x(s[0]), y(s[k]))));
    g.stroke();
  }
}

function connect() {
  const es = new EventSource("/events");
  es.onmessage = (e) => {
    const d = JSON.parse(e.data);
    d.now_ms = Date.now();
    if (lastData) d.you = lastData.you;  // the stream does not carry the login; /api/overview does
    render(d);
  };
  es.onerror = () => { $("link").textContent = "gateway unreachable — retrying"; $("link").className = "pill down"; };
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const r = await post("/api/login", {user: f.get("user"), password: f.get("password")});
    $("message").textContent = r.ok ? `Logged in as ${r.data.user}.` : (r.data.message || "login failed");
    ev.target.reset();
    await refresh();
  });
  $("logout").addEventListener("click", async () => { await post("/api/logout"); await refresh(); });
  refresh().then(connect);
});
