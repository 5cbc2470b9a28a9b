// The web HMI: camera tiles with detections, the live event timeline, active alerts, and an Ask box whose
// answer streams in. Everything comes from the gateway (/api/...), which is a gRPC client of the service.
"use strict";

const $ = (id) => document.getElementById(id);
const SNAPSHOT_MS = 1000;
const ALERTS_MS = 2000;
const tiles = new Map();   // camera_id -> {root, canvas, state}

function setConnection(ok, text) {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = "badge " + (ok ? "ok" : "down");
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(`${body.error?.code}: ${body.error?.message}`);
  return body;
}

// --- cameras ------------------------------------------------------------------------------------------------
function tileFor(camera) {
  let tile = tiles.get(camera.camera_id);
  if (tile) return tile;
  const root = document.createElement("div");
  root.className = "tile";
  root.dataset.camera = camera.camera_id;
  const canvas = document.createElement("canvas");
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.innerHTML = `<span class="name"></span><span class="state"></span>`;
  caption.querySelector(".name").textContent = camera.camera_id;
  root.append(canvas, caption);
  $("cameras").append(root);
  tile = {root, canvas, state: caption.querySelector(".state")};
  tiles.set(camera.camera_id, tile);
  return tile;
}

function drawSnapshot(tile, snap) {
  const image = new Image();
  image.onload = () => {
    const ctx = tile.canvas.getContext("2d");
    tile.canvas.width = image.width;
    tile.canvas.height = image.height;
    ctx.drawImage(image, 0, 0);
    ctx.lineWidth = Math.max(2, image.width / 240);
    ctx.font = `${Math.max(12, image.width / 40)}px system-ui`;
    for (const o of snap.objects || []) {
      ctx.strokeStyle = o.label === "face" ? "#58a6ff" : o.label === "person" ? "#f85149" : "#3fb950";
      ctx.strokeRect(o.x0, o.y0, o.x1 - o.x0, o.y1 - o.y0);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillText(`${o.label} ${(o.score * 100).toFixed(0)}%`, o.x0 + 3, Math.max(14, o.y0 - 4));
    }
  };
  image.src = `data:${snap.image.mime};base64,${snap.image.base64}`;
  const age = Number(snap.age_seconds || 0);
  tile.root.classList.toggle("stale", Boolean(snap.stale));
  const labels = (snap.objects || []).map((o) => o.label);
  tile.state.textContent = snap.stale ? `stale: ${age.toFixed(0)} s old` : `${labels.length} detections`;
  tile.root.dataset.objects = labels.join(",");
}

async function refreshCameras() {
  try {
    const {cameras = []} = await getJSON("/api/cameras");
    await Promise.all(cameras.map(async (camera) => {
      const tile = tileFor(camera);
      tile.root.classList.toggle("down", !camera.up);
      try {
        drawSnapshot(tile, await getJSON(`/api/cameras/${encodeURIComponent(camera.camera_id)}/snapshot?max_width=480`));
      } catch (err) {
        tile.state.textContent = camera.up ? String(err.message) : "down";
      }
    }));
  } catch (err) {
    setConnection(false, `cameras: ${err.message}`);
  }
}

// --- alerts -------------------------------------------------------------------------------------------------
async function refreshAlerts() {
  try {
    const {safety, sentinel} = await getJSON("/api/alerts");
    const list = $("alerts");
    list.replaceChildren();
    for (const alert of safety.active || []) {
      const li = document.createElement("li");
      li.dataset.kind = alert.kind;
      li.textContent = `${alert.kind.replaceAll("_", " ")} (level ${alert.escalation_level || 0}) ${alert.detail || ""}`;
      list.append(li);
    }
    if (!list.children.length) list.innerHTML = `<li class="none">none</li>`;
    const state = (sentinel.state || "").replace("SENTINEL_STATE_", "").toLowerCase();
    $("sentinel").textContent = `Sentinel: ${sentinel.armed ? `armed, ${state}` : "disarmed"}` +
      (sentinel.reason ? ` (${sentinel.reason})` : "");
  } catch (err) {
    $("sentinel").textContent = `alerts: ${err.message}`;
  }
}

// --- events (SSE; the browser resumes after the last id itself) ---------------------------------------------
// What a skill did beyond its message: the vehicle actions it asked for and the attachments it kept.
function eventDetail(event) {
  const payload = typeof event.payload === "object" && event.payload ? event.payload : {};
  const parts = [];
  if (Array.isArray(payload.actions) && payload.actions.length) parts.push(`actions: ${payload.actions.join(", ")}`);
  if (payload.escalation_level) parts.push(`level ${payload.escalation_level}`);
  if (payload.clip_id) parts.push(`clip ${payload.clip_id} (incar sentinel clip ${payload.clip_id} --out DIR)`);
  if (payload.level || payload.bay) parts.push(`level ${payload.level || "?"}, bay ${payload.bay || "?"}`);
  if (event.kind === "car_finder.parked" && payload.record_id) parts.push(`incar carfinder snapshot ${payload.record_id}`);
  if (payload.method) parts.push(`by ${payload.method}`);
  return parts.join(" · ");
}

function followEvents() {
  const source = new EventSource("/api/events");
  source.onopen = () => setConnection(true, "connected");
  source.onerror = () => setConnection(false, "reconnecting…");
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const li = document.createElement("li");
    const severity = (event.severity || "SEVERITY_INFO").replace("SEVERITY_", "");
    li.className = `sev-${severity}`;
    li.dataset.kind = event.kind;
    const when = event.time ? new Date(event.time).toLocaleTimeString() : "";
    li.innerHTML = `<span class="when"></span> <span class="message"></span> <span class="kind"></span>`;
    li.querySelector(".when").textContent = when;
    li.querySelector(".message").textContent = event.message;
    li.querySelector(".kind").textContent = event.kind + (event.camera_id ? ` [${event.camera_id}]` : "");
    const detail = eventDetail(event);
    if (detail) {
      const span = document.createElement("div");
      span.className = "detail";
      span.textContent = detail;
      li.append(span);
    }
    $("events").prepend(li);
    while ($("events").children.length > 200) $("events").lastChild.remove();
  };
}

// --- ask (a POST whose body is an SSE stream: text pieces, then the done record) ----------------------------
async function ask(question) {
  const answer = $("answer");
  const meta = $("answer-meta");
  answer.textContent = "";
  answer.dataset.state = "streaming";
  meta.textContent = "";
  $("ask-button").disabled = true;
  try {
    const cameras = [...tiles.keys()];
    const response = await fetch("/api/ask", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify({question, camera_ids: cameras})});
    if (!response.ok) {
      const body = await response.json();
      throw new Error(`${body.error?.code}: ${body.error?.message}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        const item = JSON.parse(data);
        if (item.text !== undefined) answer.textContent += item.text;
        if (item.error) throw new Error(`${item.error.code}: ${item.error.message}`);
        if (item.done) {
          const t = item.done.timings || {};
          meta.textContent = `${item.done.handled_by || "model"}` + (item.done.tool ? ` via ${item.done.tool}` : "") +
            ` · first token ${fmtMs(t.time_to_first_token_s)} · ${Number(t.tokens_per_second || 0).toFixed(1)} tok/s`;
        }
      }
    }
    answer.dataset.state = "done";
  } catch (err) {
    answer.dataset.state = "error";
    answer.textContent = String(err.message);
  } finally {
    $("ask-button").disabled = false;
  }
}

function fmtMs(seconds) {
  return seconds === undefined ? "–" : `${(Number(seconds) * 1000).toFixed(0)} ms`;
}

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (question) ask(question);
});

followEvents();
refreshCameras();
refreshAlerts();
setInterval(refreshCameras, SNAPSHOT_MS);
setInterval(refreshAlerts, ALERTS_MS);
