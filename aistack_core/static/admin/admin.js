// The aistack admin page: plain script, no build step, nothing fetched from elsewhere.
// Every figure comes from the gateway's JSON routes; text from the server is always
// placed with textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "aistack.apiKey";
const STATUS_EVERY_MS = 1000;
const DETAILS_EVERY_MS = 5000;
const LISTINGS_EVERY_MS = 30000;
const RECENT_SHOWN = 20;
// The page's own metrics polls are recorded by the gateway; the list of last requests leaves them out.
const isOwnPoll = (r) => r.method === "GET" && r.path === "/admin/api/metrics";
const CLASS_COLOURS = {
  "2xx": "#2f855a", "3xx": "#4a5568", "4xx": "#b7791f", "5xx": "#c53030",
  "503-busy": "#dd6b20", "client-disconnect": "#a0aec0",
};
const TTS_FORMAT_TYPES = { mp3: "audio/mpeg", wav: "audio/wav", opus: "audio/ogg", flac: "audio/flac" };

const page = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  signedIn: false,
  timers: [],
  recorded: null,      // {blob, name} from the microphone
  recorder: null,
  fileChosenAt: 0,
  chat: [],
  models: [],          // the merged model list
  listed: null,        // the last /v1/models answer
  listedAt: 0,
  voices: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// --- talking to the gateway ------------------------------------------------------

class ApiError extends Error {
  constructor(status, kind, message, retryAfter, requestId) {
    super(message);
    this.status = status;
    this.kind = kind;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
  }
}

async function errorFrom(response) {
  let kind = "", message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      kind = body.error.kind || "";
      message = body.error.message || message;
    }
  } catch (_) { /* not JSON: keep the status text */ }
  return new ApiError(response.status, kind, message, response.headers.get("Retry-After"),
    response.headers.get("X-Request-ID"));
}

async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (page.key) headers.set("Authorization", "Bearer " + page.key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "network", "The gateway could not be reached (is aistack still running?).");
  }
  if (response.status === 401) {
    const error = await errorFrom(response);
    showLogin(page.key ? "That key was refused." : "");
    throw error;
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function getJson(path) {
  return (await call(path)).json();
}

// What a person wants to read, not the raw envelope.
function explain(error) {
  if (!(error instanceof ApiError)) return { title: "Something went wrong in the page", detail: String(error) };
  const detail = error.message + (error.requestId ? ` (request ${error.requestId})` : "");
  if (error.status === 503 && error.retryAfter)
    return { title: `Busy — try again in ${error.retryAfter} s`, detail };
  const titles = {
    0: "Gateway unreachable", 400: "The request was not accepted", 401: "API key needed",
    404: "Not found", 405: "Not allowed", 409: "Not now", 413: "Too large",
    499: "Cancelled", 502: "The upstream answered badly", 503: "Not available right now",
    504: "The upstream took too long",
  };
  return { title: titles[error.status] || `Error ${error.status}`, detail };
}

function showError(id, error) {
  const box = $(id);
  if (!error) { box.hidden = true; box.replaceChildren(); return; }
  const { title, detail } = explain(error);
  box.replaceChildren(el("strong", {}, title), el("span", {}, detail));
  box.hidden = false;
}

// --- signing in ------------------------------------------------------------------

function showLogin(message) {
  page.signedIn = false;
  stopPolling();
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("status-uptime").textContent = "API key needed";
  const box = $("login-error");
  box.textContent = message || "";
  box.hidden = !message;
  $("login-key").focus();
}

async function start() {
  try {
    await refreshStatus();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;  // the login form is showing
    $("status-uptime").textContent = explain(err).title;
    setTimeout(start, 2000);
    return;
  }
  page.signedIn = true;
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !page.key;
  await refreshDetails({ listings: true });
  startPolling();
}

function startPolling() {
  stopPolling();
  page.timers.push(setInterval(() => refreshStatus().catch(() => {}), STATUS_EVERY_MS));
  page.timers.push(setInterval(() => refreshDetails().catch(() => {}), DETAILS_EVERY_MS));
}

function stopPolling() {
  page.timers.forEach(clearInterval);
  page.timers = [];
}

// --- status ----------------------------------------------------------------------

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.floor(seconds % 60)} s`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours} h ${minutes % 60} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

function slotText(slot) {
  if (!slot.busy) return "free";
  return `${slot.capability} · ${slot.model} · request ${slot.request_id} · ${duration(slot.held_s)}`;
}

// After the page's own request: now, and once more when the gateway has recorded it
// (it writes the outcome after the answer has gone out).
function refreshSoon() {
  Promise.all([refreshStatus(), refreshDetails()]).catch(() => {});
  setTimeout(() => refreshDetails().catch(() => {}), 400);
}

async function refreshStatus() {
  const status = await getJson("/admin/api/status");
  $("status-version").textContent = "v" + status.version;
  $("status-uptime").textContent = "up " + duration(status.uptime_s);
  const slotPill = $("slot-state");
  slotPill.textContent = status.slot.busy ? "slot: " + slotText(status.slot) : "slot: free";
  slotPill.className = "pill " + (status.slot.busy ? "busy" : "ok");
  const ready = status.readiness;
  const readyPill = $("ready-state");
  readyPill.textContent = ready.ready ? "ready" : Object.keys(ready.failed).length ? "not ready: preload failed"
    : "loading: " + ready.pending.join(", ");
  readyPill.className = "pill " + (ready.ready ? "ok" : Object.keys(ready.failed).length ? "bad" : "busy");
  $("fact-version").textContent = status.version + ` (pid ${status.pid})`;
  $("fact-started").textContent = `${new Date(status.started_at).toLocaleString()} (${duration(status.uptime_s)})`;
  $("fact-slot").textContent = slotText(status.slot);
  $("fact-busy").textContent = String(status.slot.busy_rejections);
  const failed = Object.entries(ready.failed).map(([model, why]) => `${model}: ${why}`);
  $("fact-ready").textContent = ready.preload.length === 0 ? "ready (nothing to preload)"
    : ready.ready ? `ready; preloaded ${ready.loaded.join(", ")}`
    : failed.length ? "failed — " + failed.join("; ") : "loading " + ready.pending.join(", ");
  $("fact-keepalive").textContent = duration(status.keep_alive_s) + " after last use (loaded on purpose: until unloaded)";
  return status;
}

// --- plugins and models ----------------------------------------------------------

// Quick reads (unrecorded by the gateway) often; the public listings, which are
// recorded like any API call, only now and then and after an action.
async function refreshDetails({ listings = false } = {}) {
  const now = Date.now();
  const wantListings = listings || !page.listed || now - page.listedAt > LISTINGS_EVERY_MS;
  const [admin, metrics, plugins, listed] = await Promise.all([
    getJson("/admin/api/models"), getJson(`/admin/api/metrics?recent=${RECENT_SHOWN + 20}`),
    wantListings ? getJson("/-/plugins") : null, wantListings ? getJson("/v1/models") : null,
  ]);
  if (wantListings) {
    page.listed = listed.data;
    page.listedAt = now;
    renderPlugins(plugins.plugins);
    await fillPlayground(page.listed);
  }
  page.models = mergeModels(admin.data, page.listed);
  renderModels(page.models);
  renderTraffic(metrics.metrics);
}

function renderPlugins(plugins) {
  const rows = plugins.map((plugin) => {
    const detail = plugin.status === "loaded"
      ? (plugin.registered.length ? plugin.registered.join(", ") : "registered nothing")
      : plugin.error || "";
    // The fix comes from the plugin's own record; the page never guesses it.
    const hint = plugin.install_hint;
    return el("tr", { dataset: { plugin: plugin.name } },
      el("td", {}, plugin.name),
      el("td", { class: "status-" + plugin.status }, plugin.status),
      el("td", {}, [plugin.distribution, plugin.version].filter(Boolean).join(" ") || "–"),
      el("td", {}, detail),
      el("td", { class: "fix" }, plugin.status === "skipped" && hint ? el("code", {}, hint) : ""));
  });
  $("plugins-table").tBodies[0].replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "empty" }, "no plugins"))]));
}

function mergeModels(inProcess, listed) {
  const known = new Set(inProcess.map((m) => m.id));
  const upstream = listed
    .filter((m) => !known.has(m.id) && !m.is_routing_alias)
    .map((m) => ({ id: m.id, capability: (m.capabilities || []).join(", "), provider: m.owned_by,
                   in_process: false, available: true, resident: false }));
  return [...inProcess, ...upstream];
}

function ago(iso) {
  if (!iso) return "–";
  return duration(Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000)) + " ago";
}

function renderModels(models) {
  const rows = models.map((model) => {
    let state, stateClass, action = "";
    if (!model.in_process) {
      state = "served by an upstream"; stateClass = "state-upstream";
    } else if (model.resident) {
      state = model.in_use ? "resident, in use" : model.pinned ? "resident (kept)" : "resident";
      stateClass = "state-resident";
      action = el("button", { class: "unload secondary", type: "button", dataset: { model: model.id } }, "Unload");
    } else if (!model.available) {
      state = "unavailable: " + model.unavailable; stateClass = "state-unavailable";
      action = el("button", { class: "load", type: "button", dataset: { model: model.id } }, "Load");
    } else {
      state = "not loaded"; stateClass = "state-idle";
      action = el("button", { class: "load", type: "button", dataset: { model: model.id } }, "Load");
    }
    return el("tr", { dataset: { model: model.id, resident: String(!!model.resident) } },
      el("td", {}, model.id),
      el("td", {}, model.capability),
      el("td", {}, model.provider || "–"),
      el("td", { class: "state " + stateClass }, state),
      el("td", {}, model.resident ? ago(model.last_used_at) : "–"),
      el("td", {}, model.load_s !== undefined ? model.load_s.toFixed(2) + " s" : "–"),
      el("td", {}, model.memory_mb !== undefined && model.memory_mb !== null ? `≈ ${model.memory_mb.toFixed(0)} MB` : "–"),
      el("td", {}, action));
  });
  $("models-table").tBodies[0].replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8, class: "empty" }, "no models"))]));
}

function modelPath(id) {
  return "/admin/api/models/" + id.split("/").map(encodeURIComponent).join("/");
}

async function modelAction(button) {
  const id = button.dataset.model;
  const unloading = button.classList.contains("unload");
  button.disabled = true;
  button.textContent = unloading ? "Unloading…" : "Loading…";
  try {
    await call(unloading ? modelPath(id) : modelPath(id) + "/load", { method: unloading ? "DELETE" : "POST" });
    showError("models-error", null);
  } catch (err) {
    showError("models-error", err);
  }
  await Promise.all([refreshStatus(), refreshDetails()]).catch(() => {});
}

// --- traffic ---------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function barChart(title, series, keys, colours, unit) {
  // One row per series, one bar per key, widths scaled to the largest value.
  const rowHeight = 14 * keys.length + 10, labelWidth = 150, width = 420;
  const max = Math.max(1e-9, ...series.flatMap((s) => keys.map((k) => s.values[k] || 0)));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${Math.max(1, series.length) * rowHeight + 4}`, role: "img",
                             "aria-label": title });
  series.forEach((s, row) => {
    const top = row * rowHeight + 2;
    chart.append(svg("text", { x: 0, y: top + 12 }, s.label.length > 24 ? s.label.slice(0, 23) + "…" : s.label));
    keys.forEach((key, i) => {
      const value = s.values[key];
      if (value === null || value === undefined) return;
      const barWidth = Math.max(1, (width - labelWidth - 70) * value / max);
      const y = top + i * 14;
      const bar = svg("rect", { x: labelWidth, y, width: barWidth, height: 11, fill: colours[i], rx: 2 });
      bar.append(svg("title", {}, `${s.label} ${key}: ${value} ${unit}`));
      chart.append(bar, svg("text", { x: labelWidth + barWidth + 4, y: y + 10 }, `${formatNumber(value)} ${unit}`));
    });
  });
  return chart;
}

function stackedChart(title, series) {
  const rowHeight = 18, labelWidth = 150, width = 420;
  const max = Math.max(1, ...series.map((s) => s.total));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${Math.max(1, series.length) * rowHeight + 4}`, role: "img",
                             "aria-label": title });
  series.forEach((s, row) => {
    const y = row * rowHeight + 2;
    chart.append(svg("text", { x: 0, y: y + 12 }, s.label.length > 24 ? s.label.slice(0, 23) + "…" : s.label));
    let x = labelWidth;
    for (const [cls, count] of Object.entries(s.byClass)) {
      const w = (width - labelWidth - 40) * count / max;
      const bar = svg("rect", { x, y, width: Math.max(1, w), height: 13, fill: CLASS_COLOURS[cls] || "#718096" });
      bar.append(svg("title", {}, `${s.label} ${cls}: ${count}`));
      chart.append(bar);
      x += w;
    }
    chart.append(svg("text", { x: x + 4, y: y + 11 }, String(s.total)));
  });
  return chart;
}

function formatNumber(value) {
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(value >= 1 ? 2 : 3);
}

function legend(entries) {
  return el("div", { class: "legend" },
    entries.map(([name, colour]) => {
      const swatch = el("i");
      swatch.style.background = colour;  // CSSOM, which the page's CSP allows (a style attribute it does not)
      return el("span", {}, swatch, name);
    }));
}

function renderTraffic(metrics) {
  const box = $("traffic-charts");
  if (!metrics) {
    box.replaceChildren(el("p", { class: "empty" }, "Metrics are off on this server (AISTACK_OBS_METRICS=off)."));
    $("recent-table").tBodies[0].replaceChildren();
    return;
  }
  $("traffic-window").textContent = `(last ${metrics.window_min} min)`;
  const series = [];
  for (const [capability, entry] of Object.entries(metrics.capabilities)) {
    for (const [model, data] of Object.entries(entry.models)) {
      if (!data.window || !data.window.requests) continue;
      series.push({ label: model ? `${capability} · ${model}` : capability, window: data.window });
    }
  }
  if (!series.length) {
    box.replaceChildren(el("p", { class: "empty" }, "No requests in the window yet."));
  } else {
    const classes = [...new Set(series.flatMap((s) => Object.keys(s.window.by_class)))];
    const requests = stackedChart("Requests by class",
      series.map((s) => ({ label: s.label, byClass: s.window.by_class, total: s.window.requests })));
    const pColours = ["#4299e1", "#2b6cb0", "#1a365d"];
    const latency = barChart("Latency", series.map((s) => ({ label: s.label, values: s.window.latency_ms })),
      ["p50", "p95", "p99"], pColours, "ms");
    const withRtf = series.filter((s) => s.window.rtf);
    const charts = [
      el("div", { class: "chart", dataset: { chart: "requests" } }, el("h4", {}, "Requests by class"),
        legend(classes.map((c) => [c, CLASS_COLOURS[c] || "#718096"])), requests),
      el("div", { class: "chart", dataset: { chart: "latency" } }, el("h4", {}, "Latency p50 / p95 / p99"),
        legend([["p50", pColours[0]], ["p95", pColours[1]], ["p99", pColours[2]]]), latency),
    ];
    if (withRtf.length) {
      charts.push(el("div", { class: "chart", dataset: { chart: "rtf" } },
        el("h4", {}, "Real-time factor p50 / p95 / p99 (below 1 is faster than real time)"),
        barChart("Real-time factor", withRtf.map((s) => ({ label: s.label, values: s.window.rtf })),
          ["p50", "p95", "p99"], ["#68d391", "#38a169", "#22543d"], "×")));
    }
    box.replaceChildren(...charts);
  }
  const rows = metrics.recent.filter((r) => !isOwnPoll(r)).slice(0, RECENT_SHOWN).map((r) => el("tr", { class: "class-" + r.class },
    el("td", {}, new Date(r.ts).toLocaleTimeString()),
    el("td", {}, el("code", {}, r.request_id)),
    el("td", {}, r.method), el("td", {}, r.path), el("td", {}, r.model || "–"),
    el("td", {}, String(r.status)), el("td", {}, r.class),
    el("td", {}, r.latency_ms.toFixed(1) + " ms")));
  $("recent-table").tBodies[0].replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8, class: "empty" }, "no requests yet"))]));
}

// --- playground ------------------------------------------------------------------

function fillSelect(select, values, preferred) {
  const current = select.value;
  const wanted = values.includes(current) ? current : values.includes(preferred) ? preferred : values[0];
  const same = select.options.length === values.length && values.every((v, i) => select.options[i].value === v);
  if (!same) select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
  if (wanted !== undefined) select.value = wanted;
}

async function fillPlayground(listed) {
  const withCapability = (cap) => listed.filter((m) => (m.capabilities || []).includes(cap)).map((m) => m.id);
  fillSelect($("asr-model"), withCapability("asr"), "auto");
  const ttsModels = withCapability("tts");
  if (page.voices === null) {
    try { page.voices = await getJson("/v1/voices"); } catch (_) { page.voices = { data: [], openai_voices: {} }; }
  }
  fillSelect($("tts-model"), ttsModels, page.voices.default_model);
  fillVoices();
  const chatModels = withCapability("llm");
  $("chat-form").hidden = chatModels.length === 0;
  fillSelect($("chat-model"), chatModels);
}

function fillVoices() {
  const model = $("tts-model").value;
  const own = (page.voices.data || []).find((m) => m.model === model);
  const voices = own ? own.voices : Object.keys(page.voices.openai_voices || {});
  fillSelect($("tts-voice"), voices.length ? voices : ["alloy"], own ? own.default_voice : "alloy");
}

function audioSource() {
  const file = $("asr-file").files[0];
  if (page.recorded && (!file || page.recorded.at > page.fileChosenAt)) return page.recorded;
  return file ? { blob: file, name: file.name } : null;
}

async function transcribe(event) {
  event.preventDefault();
  showError("asr-error", null);
  const source = audioSource();
  if (!source) {
    showError("asr-error", new ApiError(400, "malformed", "Pick an audio file or record from the microphone first."));
    return;
  }
  const format = $("asr-format").value;
  const form = new FormData();
  form.append("file", source.blob, source.name);
  form.append("model", $("asr-model").value);
  form.append("response_format", format);
  const button = $("asr-submit");
  button.disabled = true;
  button.textContent = "Transcribing…";
  $("asr-result").hidden = true;
  try {
    const response = await call("/v1/audio/transcriptions", { method: "POST", body: form });
    showTranscript(format, format.endsWith("json") ? await response.json() : await response.text());
  } catch (err) {
    showError("asr-error", err);
  } finally {
    button.disabled = false;
    button.textContent = "Transcribe";
    refreshSoon();
  }
}

function showTranscript(format, body) {
  const segments = $("asr-segments");
  const raw = $("asr-raw");
  segments.hidden = raw.hidden = true;
  if (typeof body === "string") {
    $("asr-text").textContent = "";
    raw.textContent = body;
    raw.hidden = false;
  } else {
    $("asr-text").textContent = body.text || "(no speech found)";
    if (Array.isArray(body.segments)) {
      segments.tBodies[0].replaceChildren(...body.segments.map((s) => el("tr", {},
        el("td", {}, String(s.id)), el("td", {}, s.start.toFixed(2) + " s"), el("td", {}, s.end.toFixed(2) + " s"),
        el("td", {}, s.text))));
      segments.hidden = false;
    }
  }
  $("asr-result").hidden = false;
}

async function toggleRecording() {
  const button = $("asr-record");
  if (page.recorder && page.recorder.state === "recording") {
    page.recorder.stop();
    return;
  }
  showError("asr-error", null);
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    showError("asr-error", new ApiError(400, "malformed",
      "The microphone is not available here (" + err.message + "). Pick a file instead; recording needs " +
      "http://127.0.0.1 or https and the browser's permission."));
    return;
  }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  page.recorder = recorder;
  const startedAt = Date.now();
  recorder.addEventListener("dataavailable", (e) => { if (e.data.size) chunks.push(e.data); });
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((t) => t.stop());
    const type = recorder.mimeType || "audio/webm";
    const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
    page.recorded = { blob: new Blob(chunks, { type }), name: "recording." + ext, at: Date.now() };
    button.textContent = "● Record";
    button.classList.remove("recording");
    $("asr-source").textContent = `recording, ${((Date.now() - startedAt) / 1000).toFixed(1)} s`;
  });
  recorder.start();
  button.textContent = "■ Stop";
  button.classList.add("recording");
  $("asr-source").textContent = "recording…";
}

async function speak(event) {
  event.preventDefault();
  showError("tts-error", null);
  const format = $("tts-format").value;
  const body = { model: $("tts-model").value, voice: $("tts-voice").value, input: $("tts-text").value,
                 response_format: format };
  const button = $("tts-submit");
  button.disabled = true;
  button.textContent = "Speaking…";
  try {
    const response = await call("/v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const blob = await response.blob();
    const audio = $("tts-audio");
    if (audio.src) URL.revokeObjectURL(audio.src);
    audio.src = URL.createObjectURL(new Blob([blob], { type: TTS_FORMAT_TYPES[format] || blob.type }));
    audio.hidden = false;
    audio.play().catch(() => { /* autoplay may be refused; the controls are there */ });
  } catch (err) {
    showError("tts-error", err);
  } finally {
    button.disabled = false;
    button.textContent = "Speak";
    refreshSoon();
  }
}

function renderChat() {
  $("chat-log").replaceChildren(...page.chat.map((m) => el("div", { class: "msg " + m.role }, m.content)));
}

async function sendChat(event) {
  event.preventDefault();
  showError("chat-error", null);
  const text = $("chat-input").value.trim();
  if (!text) return;
  page.chat.push({ role: "user", content: text });
  renderChat();
  $("chat-input").value = "";
  const button = $("chat-submit");
  button.disabled = true;
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("chat-model").value, messages: page.chat, stream: false }),
    });
    const answer = await response.json();
    const message = answer.choices && answer.choices[0] && answer.choices[0].message;
    page.chat.push({ role: "assistant", content: (message && message.content) || "(empty answer)" });
    renderChat();
  } catch (err) {
    page.chat.pop();
    $("chat-input").value = text;
    renderChat();
    showError("chat-error", err);
  } finally {
    button.disabled = false;
  }
}

// --- wiring ----------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    page.key = $("login-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, page.key);
    $("login-error").hidden = true;
    start();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    page.key = "";
    showLogin("");
  });
  $("models-table").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-model]");
    if (button) modelAction(button);
  });
  $("asr-file").addEventListener("change", () => {
    page.fileChosenAt = Date.now();
    const file = $("asr-file").files[0];
    $("asr-source").textContent = file ? `file ${file.name}` : "no audio chosen";
  });
  $("asr-record").addEventListener("click", toggleRecording);
  $("asr-form").addEventListener("submit", transcribe);
  $("tts-form").addEventListener("submit", speak);
  $("tts-model").addEventListener("change", fillVoices);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-clear").addEventListener("click", () => { page.chat = []; renderChat(); });
  start();
});
