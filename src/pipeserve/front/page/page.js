// The page: try the model in a form that fits its task, watch the server. It uses only the
// documented JSON routes (/info, /stats, /v1/models, POST /, /rerank, /v1/embeddings,
// /v1/chat/completions, /v1/completions), with the API key the user typed, if the server asks.
"use strict";

const POLL_MS = 1000;
const HISTORY = 180; // points kept for the charts: three minutes at one a second
const KEY = "pipeserve-api-key";
const $ = (id) => document.getElementById(id);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child);
  return node;
}

// --- talking to the server ---------------------------------------------------------------------

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {}

function errorMessage(body, status) {
  // Each dialect's envelope: {"error": "..."}, TEI/TGI's {"error", "error_type"}, OpenAI's {"error": {"message"}}.
  const error = body && body.error;
  if (typeof error === "string") return error;
  if (error && typeof error.message === "string") return error.message;
  return `HTTP ${status}`;
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) { lockOut(); throw new ApiError("the API key is missing or wrong"); }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!response.ok) throw new ApiError(errorMessage(body, response.status));
  return body;
}

// With several models served, the one the picker names (null: the first, at the root routes).
let chosenModel = null;

// A model route as the chosen model's: OpenAI's by its body's "model", the others under /models/{name}.
function forModel(path, document) {
  if (!chosenModel) return [path, document];
  if (path.startsWith("/v1/")) return [path, document && { ...document, model: chosenModel }];
  return [path === "/" ? `/models/${chosenModel}` : `/models/${chosenModel}${path}`, document];
}

function postJson(path, document) {
  const [route, body] = forModel(path, document);
  return call(route, { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
}

// --- access --------------------------------------------------------------------------------------

function lock(message) {
  $("app").hidden = true;
  $("locked").hidden = false;
  $("key-error").textContent = message || "";
  $("key").focus();
}

function lockOut() {
  if (pollTimer) { clearInterval(pollTimer); pollTimer = null; } // no polling behind the prompt
  lock(sessionStorage.getItem(KEY) ? "The key was not accepted." : "");
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  start();
});

// --- drawing answers -------------------------------------------------------------------------------

function show(...nodes) { $("output").replaceChildren(...nodes); }
function showError(error) { show(el("p", { class: "error", "data-testid": "error", text: error.message || String(error) })); }

function bars(rows) { // rows: [{name, value}] with value in 0..1
  return el("div", { class: "bars", "data-testid": "bars" }, ...rows.map(({ name, value }) => {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
    return el("div", { class: "bar" }, el("span", { class: "name", title: name, text: name }),
              el("div", { class: "track" }, fill), el("span", { class: "value", text: value.toFixed(3) }));
  }));
}

const labelled = (items) => items.map((item) => ({ name: String(item.label), value: Number(item.score) }));
const firstList = (body) => (Array.isArray(body) && Array.isArray(body[0]) ? body[0] : body);

function entities(text, found) {
  const parts = [];
  let at = 0;
  for (const entity of [...found].sort((a, b) => a.start - b.start)) {
    if (entity.start == null || entity.start < at) continue;
    parts.push(text.slice(at, entity.start));
    parts.push(el("mark", { title: `${entity.entity_group || entity.entity} ${Number(entity.score).toFixed(3)}` },
                  text.slice(entity.start, entity.end), el("small", { text: entity.entity_group || entity.entity })));
    at = entity.end;
  }
  parts.push(text.slice(at));
  return el("p", { class: "entities", "data-testid": "entities" }, ...parts);
}

function similarity(texts, vectors) {
  const dot = (a, b) => a.reduce((sum, x, i) => sum + x * b[i], 0);
  const norms = vectors.map((v) => Math.sqrt(dot(v, v)) || 1);
  const head = el("tr", {}, el("th"), ...texts.map((_, i) => el("th", { text: `#${i + 1}` })));
  const rows = texts.map((text, i) => el("tr", {}, el("th", { title: text, text: `#${i + 1} ${text.slice(0, 24)}` }),
    ...vectors.map((_, j) => {
      const value = dot(vectors[i], vectors[j]) / (norms[i] * norms[j]);
      const cell = el("td", { text: value.toFixed(2) });
      cell.style.background = `rgba(53, 89, 224, ${Math.max(0, value) * 0.6})`;
      return cell;
    })));
  return el("table", { class: "matrix", "data-testid": "matrix" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

// --- the forms, one per kind of task -----------------------------------------------------------------

function textBox(placeholder, value = "", testid = "input") {
  return el("textarea", { "data-testid": testid, placeholder, text: value });
}

function runButton() { return el("button", { type: "submit", "data-testid": "run", text: "Run" }); }

function form(fields, hint, run) {
  const node = $("form");
  node.replaceChildren(...fields, ...(hint ? [el("p", { class: "hint", text: hint })] : []), runButton());
  node.onsubmit = async (event) => {
    event.preventDefault();
    const button = node.querySelector("button");
    button.disabled = true;
    show(el("p", { class: "hint", text: "…" }));
    try { await run(); } catch (error) { showError(error); } finally { button.disabled = false; }
  };
}

const WIDGETS = {
  "text-classification": (info) => {
    const labels = (info.details && info.details.labels) || [];
    if (labels.length === 1) { // one output: a re-ranker (a cross-encoder) — TEI's /rerank
      const query = textBox("A query", "what do cats eat?");
      const texts = textBox("Texts to rank against it, one per line", "Cats eat fish.\nThe stock market fell.", "input-2");
      form([query, texts], "The texts are scored against the query and ranked (POST /rerank).", async () => {
        const candidates = texts.value.split("\n").map((t) => t.trim()).filter(Boolean);
        const ranked = await postJson("/rerank", { query: query.value, texts: candidates });
        show(bars(ranked.map((r) => ({ name: candidates[r.index], value: Number(r.score) }))));
      });
      return;
    }
    const text = textBox("A text to classify", "I love this movie.");
    const pair = textBox("Optional: a second text, for a model that classifies pairs", "", "input-2");
    form([text, pair], null, async () => {
      // A pair goes to TEI's /predict, which takes one as [text, text_pair] (POST / takes texts only).
      const body = pair.value.trim()
        ? await postJson("/predict", { inputs: [text.value, pair.value] })
        : await postJson("/", { inputs: text.value, parameters: { top_k: Math.max(labels.length, 1) } });
      show(bars(labelled(firstList(body))));
    });
  },
  "fill-mask": (info) => {
    const mask = (info.details && info.details.mask_token) || "[MASK]";
    const text = textBox(`A text with ${mask} in it`, `Paris is the ${mask} of France.`);
    form([text], `Write ${mask} where a word is missing.`, async () => {
      const body = await postJson("/", { inputs: text.value });
      show(bars(firstList(body).map((c) => ({ name: c.token_str, value: Number(c.score) }))));
    });
  },
  "token-classification": () => {
    const text = textBox("A text to find entities in", "My name is Wolfgang and I live in Berlin.");
    form([text], null, async () => {
      const body = await postJson("/", { inputs: text.value });
      show(entities(text.value, firstList(body)));
    });
  },
  "zero-shot-classification": () => {
    const text = textBox("A text to classify", "The new phone has a great camera.");
    const labels = el("input", { type: "text", "data-testid": "input-2", value: "technology, sports, politics" });
    form([text, el("label", { text: "Candidate labels, comma separated" }), labels], null, async () => {
      const candidate_labels = labels.value.split(",").map((l) => l.trim()).filter(Boolean);
      const body = await postJson("/", { inputs: text.value, parameters: { candidate_labels } });
      show(bars(labelled(firstList(body))));
    });
  },
  "feature-extraction": () => {
    const text = textBox("Texts to embed, one per line", "A cat sits on the mat.\nA kitten rests on a rug.\nStocks fell sharply today.");
    form([text], "Each line is embedded (POST /v1/embeddings); the matrix shows their cosine similarities.", async () => {
      const texts = text.value.split("\n").map((t) => t.trim()).filter(Boolean);
      const body = await postJson("/v1/embeddings", { input: texts, encoding_format: "float" });
      show(similarity(texts, body.data.map((d) => d.embedding)));
    });
  },
  "text-generation": (info) => chat(Boolean(info.details && info.details.chat_template)),
  image: () => filePicker("image/*"),
  audio: () => filePicker("audio/*"),
};

function filePicker(accept) {
  const picker = el("input", { type: "file", accept, "data-testid": "input" });
  form([picker], null, async () => {
    const file = picker.files[0];
    if (!file) throw new ApiError("choose a file first");
    const body = await call(forModel("/")[0], { method: "POST", body: file,
                                                headers: { "Content-Type": file.type || "application/octet-stream" } });
    show(bars(labelled(firstList(body))));
  });
}

function chat(hasTemplate) {
  const history = [];
  const text = textBox(hasTemplate ? "Say something" : "A prompt to continue", hasTemplate ? "Hello!" : "Once upon a time");
  form([text], hasTemplate ? "Tokens appear as they are generated (POST /v1/chat/completions, streamed)."
                           : "This model has no chat template: its text is continued (POST /v1/completions, streamed).", async () => {
    const said = text.value;
    const reply = el("div", { class: "message assistant", "data-testid": "reply" });
    const conversation = el("div", { class: "chat", "data-testid": "chat" },
      ...history.map((m) => el("div", { class: `message ${m.role}`, text: m.content })),
      el("div", { class: "message user", text: said }), reply);
    show(conversation);
    const route = hasTemplate ? "/v1/chat/completions" : "/v1/completions";
    const asked = hasTemplate ? { messages: [...history, { role: "user", content: said }] } : { prompt: said };
    const [path, document] = forModel(route, { ...asked, max_tokens: 64, stream: true });
    const response = await fetch(path, { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                         body: JSON.stringify(document) });
    if (!response.ok) {
      if (response.status === 401) lockOut();
      throw new ApiError(errorMessage(await response.json().catch(() => null), response.status));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(5));
        if (event.error) throw new ApiError(errorMessage(event, 500));
        const choice = event.choices && event.choices[0];
        const piece = choice ? (choice.delta ? choice.delta.content : choice.text) : null;
        if (piece) reply.textContent += piece;
      }
    }
    if (hasTemplate) history.push({ role: "user", content: said }, { role: "assistant", content: reply.textContent });
  });
}

// --- watching the server -------------------------------------------------------------------------------

const points = [];
let pollTimer = null;

const FIGURES = [
  ["requests/s", (p) => p.requestRate, 1], ["errors/s", (p) => p.errorRate, 2],
  ["latency p50 ms", (p) => p.stats.latency_ms.p50, 1], ["latency p99 ms", (p) => p.stats.latency_ms.p99, 1],
  ["queue", (p) => p.stats.queue_depth, 0], ["in flight", (p) => p.stats.in_flight, 0],
  ["batch size", (p) => p.batchSize, 1], ["tokens/s", (p) => p.tokenRate, 1],
  ["first token p50 ms", (p) => p.stats.time_to_first_token_ms.p50, 1],
  ["first token p99 ms", (p) => p.stats.time_to_first_token_ms.p99, 1],
  ["streams", (p) => p.stats.streams_open, 0],
];
const CHARTS = [
  ["requests/s (errors/s in red)", (p) => p.requestRate, (p) => p.errorRate],
  ["latency p50 / p99 ms", (p) => p.stats.latency_ms.p50, (p) => p.stats.latency_ms.p99],
  ["queue depth", (p) => p.stats.queue_depth], ["batch size", (p) => p.batchSize],
  ["tokens/s", (p) => p.tokenRate], ["first token p50 / p99 ms", (p) => p.stats.time_to_first_token_ms.p50,
                                      (p) => p.stats.time_to_first_token_ms.p99],
];

function point(stats) {
  const last = points[points.length - 1];
  const seconds = last ? Math.max(stats.time - last.stats.time, 1e-3) : null;
  const rate = (name) => (last ? (stats[name] - last.stats[name]) / seconds : null);
  const batches = last ? stats.batches - last.stats.batches : 0;
  return { stats, requestRate: rate("requests"), tokenRate: rate("generated_tokens"),
           errorRate: last ? ((stats.server_errors - last.stats.server_errors) / seconds) : null,
           batchSize: batches > 0 ? (stats.items - last.stats.items) / batches : null };
}

function number(value, digits) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }

function sparkline(series) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${HISTORY} 48`);
  svg.setAttribute("preserveAspectRatio", "none");
  const values = series.flatMap((get) => points.map(get)).filter((v) => v !== null && v !== undefined);
  const top = Math.max(1e-9, ...values);
  series.forEach((get, index) => {
    const line = document.createElementNS(ns, "polyline");
    const offset = HISTORY - points.length;
    line.setAttribute("points", points.map((p, i) => [offset + i, 46 - 44 * ((get(p) ?? 0) / top)].join(",")).join(" "));
    if (index) line.setAttribute("class", "second");
    svg.append(line);
  });
  return svg;
}

function render() {
  const latest = points[points.length - 1];
  const { stats } = latest;
  $("status").textContent = stats.status;
  $("status").className = `pill ${stats.status === "ready" ? "ready" : "unavailable"}`;
  $("device").textContent = [stats.model.device, stats.model.dtype].filter(Boolean).join(" · ");
  $("figures").replaceChildren(...FIGURES.map(([label, get, digits]) => el("div", { class: "figure", "data-figure": label },
    el("div", { class: "label", text: label }), el("div", { class: "number", text: number(get(latest), digits) }))));
  $("charts").replaceChildren(...CHARTS.map(([label, ...series]) => el("div", { class: "chart" },
    el("div", { class: "label", text: label }), sparkline(series))));
  $("workers").tBodies[0].replaceChildren(...stats.workers.map((w) => el("tr", {},
    el("td", { text: String(w.index) }), el("td", { text: w.state }), el("td", { text: String(w.pid ?? "–") }),
    el("td", { text: String(w.restarts) }))));
}

async function poll() {
  if (document.hidden) return; // nobody looks: ask nothing
  try {
    points.push(point(await call(chosenModel ? `/stats?model=${encodeURIComponent(chosenModel)}` : "/stats")));
    if (points.length > HISTORY) points.shift();
    render();
  } catch (error) {
    if (!pollTimer) return; // locked out (401): the prompt says so
    $("status").textContent = error instanceof ApiError ? `unavailable: ${error.message}` : "unreachable";
    $("status").className = "pill unavailable";
  }
}

// --- start -------------------------------------------------------------------------------------------

// The form that fits one model's task, and its name in the header.
function tryModel(info) {
  $("model").textContent = `${info.model_id || info.model || "custom pipeline"} · ${info.task || "…"}`;
  show();
  const widget = WIDGETS[info.task] || WIDGETS[info.input] || (() => form([textBox("Inputs")], null, async () => {
    show(el("pre", { text: JSON.stringify(await postJson("/", { inputs: $("form").querySelector("textarea").value }), null, 2) }));
  }));
  widget(info);
}

async function start() {
  let info;
  try {
    info = await call("/info");
  } catch (error) {
    if ($("locked").hidden) showError(error);
    return;
  }
  $("locked").hidden = true;
  $("app").hidden = false;
  const models = info.models || {};
  const names = Object.keys(models);
  if (names.length > 1) {
    $("picker-label").hidden = false;
    $("picker").replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
    $("picker").onchange = () => {
      chosenModel = $("picker").value;
      points.length = 0; // another model's figures from here on
      tryModel({ ...models[chosenModel], model_id: chosenModel });
    };
  }
  tryModel(info);
  if (!pollTimer) { pollTimer = setInterval(poll, POLL_MS); }
  poll();
}

start();
