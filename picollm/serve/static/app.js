// The picollm playground: plain JavaScript, no build step, nothing fetched but this server's own API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], selected: new Set(), controller: null, scores: [], pinned: null };

// ---------------------------------------------------------------------------------------------
// talking to the server

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("picollm-api-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function failure(response) {
  let text = response.status + " " + response.statusText;
  try { text = (await response.json()).error.message; } catch (e) { /* not JSON */ }
  if (response.status === 401) $("key-box").hidden = false;
  return new Error(text);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.json();
}

async function postJSON(path, body, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  return response;
}

// Server-sent events from a POST: call onEvent(object) for each `data:` line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

function say(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

// ---------------------------------------------------------------------------------------------
// formatting

function count(n) {
  if (n == null) return "";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "K";
  return String(n);
}

function fixed(x, digits) { return x == null ? "" : x.toFixed(digits); }

// a token's text made visible: spaces and line breaks shown
function visible(text) {
  return text.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205";
}

function surprisalColour(bits) {
  const t = Math.max(0, Math.min(bits / 16, 1));
  return `hsl(${Math.round(52 - 52 * t)}, 95%, ${Math.round(95 - 42 * t)}%)`;
}

function differenceColour(d) { // d = B's bits - A's bits per character: > 0 where A is less surprised
  const t = Math.max(0, Math.min(Math.abs(d) / 4, 1));
  if (t < 0.02) return "transparent";
  return d > 0 ? `hsl(212, 80%, ${Math.round(94 - 34 * t)}%)` : `hsl(28, 90%, ${Math.round(93 - 33 * t)}%)`;
}

// ---------------------------------------------------------------------------------------------
// the tooltip: a token's top alternatives

function showTip(span) {
  const info = span.tokenInfo;
  if (!info) return;
  const tip = $("tip");
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = "tip-head";
  const chosen = info.logprob == null ? "first token: nothing before it" :
    `p = ${(100 * Math.exp(info.logprob)).toFixed(2)}%, ${(-info.logprob / Math.LN2).toFixed(2)} bits`;
  head.textContent = `${info.model}: \u201c${visible(info.text)}\u201d \u2014 ${chosen}`;
  tip.append(head);
  const table = document.createElement("table");
  const top = info.top || [];
  const largest = top.length ? Math.exp(top[0][1]) : 1;
  for (const [label, logprob, id] of top) {
    const row = table.insertRow();
    const p = Math.exp(logprob);
    if (id === info.id) row.className = "chosen";
    row.insertCell().textContent = visible(label);
    const barCell = row.insertCell();
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(1, Math.round((p / largest) * 90)) + "px"; // relative to the likeliest
    barCell.append(bar);
    row.insertCell().textContent = (100 * p).toFixed(2) + "%";
  }
  tip.append(table);
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const left = Math.min(window.scrollX + box.left, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
  tip.style.left = Math.max(4, left) + "px";
  tip.style.top = window.scrollY + box.bottom + 6 + "px";
  document.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
  span.classList.add("active");
}

function hideTip() {
  state.pinned = null;
  $("tip").hidden = true;
  document.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
}

function tokenSpan(model, token) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = token.text;
  span.tabIndex = 0;
  span.tokenInfo = { model, id: token.id, text: token.text, logprob: token.logprob, top: token.top };
  // hover shows the alternatives while the pointer is on the token; a tap or click keeps them open
  span.addEventListener("mouseenter", () => showTip(span));
  span.addEventListener("mouseleave", () => { if (state.pinned !== span) hideTip(); });
  span.addEventListener("focus", () => showTip(span));
  span.addEventListener("click", (e) => { e.stopPropagation(); state.pinned = span; showTip(span); });
  return span;
}

// ---------------------------------------------------------------------------------------------
// models: the picker and the table

function renderModels(data) {
  state.models = data.models;
  const list = $("model-list");
  list.replaceChildren();
  data.models.forEach((m, i) => {
    const label = document.createElement("label");
    label.className = "chip";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = m.id;
    box.checked = i < 2;
    if (box.checked) state.selected.add(m.id);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(m.id); else state.selected.delete(m.id);
    });
    label.append(box, " " + m.id);
    label.title = `${m.family}${m.size ? " " + m.size : ""}, ${count(m.parameters)} parameters, ${m.tokenizer}`;
    list.append(label);
  });
  const body = document.querySelector("#models-table tbody");
  body.replaceChildren();
  const studies = new Map(data.studies.map((s) => [s.index, s]));
  for (const m of data.models) {
    const row = body.insertRow();
    const cells = [m.id, m.family, m.size || "", count(m.parameters), count(m.non_embedding_parameters), m.tokenizer,
                   m.context_length, fixed(m.val_nll, 3), fixed(m.val_bpb, 3), fixed(m.test_nll, 3), fixed(m.test_bpb, 3)];
    cells.forEach((value, k) => {
      const cell = row.insertCell();
      cell.textContent = value;
      if (k >= 3 && k !== 5) cell.className = "n";
    });
    const study = row.insertCell();
    const s = studies.get(m.study);
    if (s && s.report) {
      const link = document.createElement("a");
      link.href = s.report;
      link.textContent = s.title;
      link.target = "_blank";
      link.rel = "noopener";
      study.append(link);
    } else if (s) {
      study.textContent = s.title;
    }
  }
}

function selectedModels() {
  return state.models.map((m) => m.id).filter((id) => state.selected.has(id));
}

// ---------------------------------------------------------------------------------------------
// side-by-side generation

function column(parent, modelId, info) {
  const col = document.createElement("article");
  col.className = "column";
  col.dataset.model = modelId;
  const head = document.createElement("h3");
  head.textContent = modelId;
  const small = document.createElement("small");
  small.textContent = info ? ` ${info.family}${info.size ? " \u00b7 " + info.size : ""} \u00b7 ${count(info.parameters)}` : "";
  head.append(small);
  const out = document.createElement("div");
  out.className = "text";
  const status = document.createElement("div");
  status.className = "status";
  col.append(head, out, status);
  parent.append(col);
  return { col, out, status };
}

async function generate() {
  const models = selectedModels();
  if (!models.length) { say("Pick at least one model."); return; }
  say("");
  hideTip();
  const prompt = $("prompt").value;
  const columns = $("columns");
  columns.replaceChildren();
  const byModel = new Map();
  for (const id of models) {
    const c = column(columns, id, state.models.find((m) => m.id === id));
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = prompt;
    c.out.append(p);
    c.status.textContent = "generating\u2026";
    byModel.set(id, c);
  }
  const body = {
    models, prompt, strategy: $("strategy").value, temperature: Number($("temperature").value),
    top_p: Number($("top-p").value), top_k: Number($("top-k").value), max_tokens: Number($("max-tokens").value),
    seed: Number($("seed").value),
  };
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await postJSON("/api/generate", body, state.controller.signal);
    await readEvents(response, (event) => {
      const c = byModel.get(event.model);
      if (event.error && !event.model) { say(event.error); return; }
      if (!c) return;
      if (event.token) {
        c.out.append(tokenSpan(event.model, event.token));
        c.count = (c.count || 0) + 1;
        c.status.textContent = `${c.count} tokens\u2026`;
      } else if (event.done) {
        if (event.tail) c.out.append(document.createTextNode(event.tail));
        c.status.textContent = `${c.count || 0} tokens, ` +
          (event.done === "stop" ? "ended the story" : "reached max new tokens");
        c.col.classList.add("finished");
      } else if (event.error) {
        c.status.textContent = event.error;
        c.col.classList.add("failed");
      }
    });
  } catch (e) {
    if (e.name === "AbortError") {
      for (const c of byModel.values()) {
        if (!c.col.classList.contains("finished")) c.status.textContent = `stopped after ${c.count || 0} tokens`;
      }
    } else {
      say(e.message);
    }
  } finally {
    state.controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---------------------------------------------------------------------------------------------
// scoring a text

function statLine(r) {
  return `${r.num_tokens} tokens \u00b7 NLL ${r.nll.toFixed(1)} nats (${r.bits.toFixed(1)} bits, ` +
    `${r.nll_per_token.toFixed(3)} per token) \u00b7 perplexity ${r.perplexity.toFixed(1)} \u00b7 ` +
    `${r.bits_per_byte.toFixed(3)} bits per byte`;
}

async function score() {
  const models = selectedModels();
  const text = $("score-text").value;
  if (!models.length) { say("Pick at least one model."); return; }
  say("");
  hideTip();
  $("score").disabled = true;
  const scores = $("scores");
  scores.replaceChildren();
  try {
    const data = await (await postJSON("/api/score", { models, text })).json();
    state.scores = data.results.filter((r) => !r.error);
    state.text = text;
    for (const r of data.results) {
      const c = column(scores, r.model, state.models.find((m) => m.id === r.model));
      if (r.error) { c.status.textContent = r.error; c.col.classList.add("failed"); continue; }
      c.status.textContent = statLine(r);
      for (const t of r.tokens) {
        const span = tokenSpan(r.model, t);
        span.style.backgroundColor = surprisalColour(t.bits);
        span.classList.add("scored");
        c.out.append(span);
      }
    }
    fillDifference();
  } catch (e) {
    say(e.message);
  } finally {
    $("score").disabled = false;
  }
}

function fillDifference() {
  const box = $("diff-box");
  box.hidden = state.scores.length < 2;
  if (box.hidden) return;
  for (const [id, pick] of [["diff-a", 0], ["diff-b", 1]]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren(...state.scores.map((r) => new Option(r.model, r.model)));
    select.value = state.scores.some((r) => r.model === keep) ? keep : state.scores[pick].model;
  }
  renderDifference();
}

// each character's share of its token's bits, so that models with different tokenizers line up
function bitsPerCharacter(result, length) {
  const perChar = new Float64Array(length);
  const owner = new Int32Array(length).fill(-1);
  let offset = 0; // in UTF-16 units, as JavaScript counts the text (the server counts code points)
  result.tokens.forEach((t, k) => {
    const n = t.text.length;
    for (let i = offset; i < offset + n && i < length; i++) { perChar[i] = t.bits / n; owner[i] = k; }
    offset += n;
  });
  return { perChar, owner };
}

function renderDifference() {
  const a = state.scores.find((r) => r.model === $("diff-a").value);
  const b = state.scores.find((r) => r.model === $("diff-b").value);
  const out = $("diff");
  out.replaceChildren();
  if (!a || !b) return;
  const text = state.text;
  const A = bitsPerCharacter(a, text.length);
  const B = bitsPerCharacter(b, text.length);
  let start = 0;
  for (let i = 1; i <= text.length; i++) {
    if (i < text.length && A.owner[i] === A.owner[start] && B.owner[i] === B.owner[start]) continue;
    const span = document.createElement("span");
    span.className = "diff";
    span.textContent = text.slice(start, i);
    let bitsA = 0, bitsB = 0;
    for (let k = start; k < i; k++) { bitsA += A.perChar[k]; bitsB += B.perChar[k]; }
    span.style.backgroundColor = differenceColour((bitsB - bitsA) / (i - start));
    span.title = `${a.model}: ${bitsA.toFixed(2)} bits, ${b.model}: ${bitsB.toFixed(2)} bits`;
    out.append(span);
    start = i;
  }
}

// ---------------------------------------------------------------------------------------------
// start

function showTab(name) {
  for (const button of document.querySelectorAll("nav [data-tab]")) {
    const on = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(on));
    $("tab-" + button.dataset.tab).hidden = !on;
  }
  $("picker").hidden = name === "models";
  hideTip();
}

async function loadModels() {
  try {
    renderModels(await getJSON("/api/models"));
    say("");
  } catch (e) {
    say(e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("nav [data-tab]")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("score").addEventListener("click", score);
  $("diff-a").addEventListener("change", renderDifference);
  $("diff-b").addEventListener("change", renderDifference);
  $("api-key").addEventListener("change", (e) => {
    sessionStorage.setItem("picollm-api-key", e.target.value);
    loadModels();
  });
  document.addEventListener("click", () => hideTip());
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTip(); });
  loadModels();
});
