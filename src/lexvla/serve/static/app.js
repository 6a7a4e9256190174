// LexVLA search page: plain JavaScript over the JSON API (no framework, no build step).
// All text from the server goes into the page through textContent, never as HTML.
"use strict";

const QUERY_WORDS_SHOWN = 24;
const K = 24;

const state = {
  words: [],          // current query: [{word, weight, changed}]
  original: [],       // the query as the model made it (for "Undo edits")
  source: "",
  results: [],
  selected: null,     // doc id shown in the detail panel
  showAllWords: false,
  inspectFile: null,
  groundedWord: null, // the one word whose patches are lit, or null for the whole query
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = (body && body.error) || `request failed (${response.status})`;
    throw new Error(message);
  }
  return body;
}

const postJSON = (path, data) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });

function say(text, isError = false, target = "message") {
  const node = $(target);
  node.textContent = text;
  node.classList.toggle("error", isError);
}

const fmt = (x, digits = 3) => Number(x).toFixed(digits);
const sig = (x) => Number(x).toPrecision(3); // scores and products: 3 significant digits

// ------------------------------------------------------------------------------------- search
async function searchText(event) {
  event.preventDefault();
  const text = $("q").value.trim();
  if (!text) { say("Type a few words describing the image you are looking for.", true); return; }
  await runSearch(() => postJSON("/api/search", { text, k: K }), `Searching for “${text}”…`);
}

async function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  form.append("k", String(K));
  await runSearch(() => api("/api/search/image", { method: "POST", body: form }),
                  `Searching with ${file.name}…`);
}

async function searchWords() {
  const words = Object.fromEntries(state.words.map((w) => [w.word, w.weight]));
  if (!state.words.length) { say("The query has no words left: add a word or undo the edits.", true); return; }
  await runSearch(() => postJSON("/api/search", { words, k: K }), "Searching with the edited words…", true);
}

async function runSearch(request, pending, keepQuery = false) {
  say(pending);
  try {
    const body = await request();
    if (!keepQuery) setQuery(body.query);
    else markSearched();
    state.results = body.results;
    renderResults();
    const n = body.results.length;
    say(n ? `${n} images, best first. Click one to see why it matched.` : "No image shares a word with this query.");
  } catch (err) {
    say(err.message, true);
  }
}

// ------------------------------------------------------------------------------------- query words
function setQuery(query) {
  state.words = query.words.map((w) => ({ word: w.word, weight: w.weight, group: w.group || w.word, changed: false }));
  state.original = state.words.map((w) => ({ ...w }));
  state.source = query.source;
  state.showAllWords = false;
  $("query-panel").hidden = false;
  markSearched();
}

function markSearched() {
  $("research").disabled = true;
  renderQuery();
}

function edited() {
  $("research").disabled = state.words.length === 0;
  $("reset-query").disabled = false;
  renderQuery();
}

function renderQuery() {
  const words = wordGroups();
  $("query-source").textContent = `${state.source} · ${words.length} words`;
  const list = $("query-words");
  list.replaceChildren();
  const shown = state.showAllWords ? words : words.slice(0, QUERY_WORDS_SHOWN);
  for (const item of shown) list.append(chip(item));
  const more = $("more-words");
  more.hidden = words.length <= QUERY_WORDS_SHOWN;
  more.textContent = state.showAllWords ? "Show fewer words" : `Show all ${words.length} words`;
}

// The forms of one word ("dog", "dogs") as one chip, named as a person reads the word (as the
// result tags are) and weighted by their sum; editing the chip edits every form.
function wordGroups() {
  const groups = new Map();
  for (const item of state.words) {
    const group = groups.get(item.group) || { forms: [], weight: 0, changed: false };
    group.forms.push(item);
    group.weight += item.weight;
    group.changed ||= item.changed;
    groups.set(item.group, group);
  }
  for (const [name, group] of groups) group.word = name;
  return [...groups.values()].sort((a, b) => b.weight - a.weight);
}

function chip(group) {
  const word = group.word;
  const change = (factor) => () => {
    for (const form of group.forms) { form.weight *= factor; form.changed = true; }
    edited();
  };
  const remove = () => { state.words = state.words.filter((w) => !group.forms.includes(w)); edited(); };
  const forms = group.forms.length > 1
    ? group.forms.map((f) => `${f.word} ${fmt(f.weight)}`).join(" + ") : word;
  return el("li", { class: "chip" + (group.changed ? " changed" : ""), "data-word": word, title: forms },
    el("span", { class: "word", text: word }),
    el("span", { class: "weight", text: fmt(group.weight) }),
    el("button", { type: "button", title: `weaker: ${word} × 0.5`, "aria-label": `lower ${word}`, onclick: change(0.5), text: "−" }),
    el("button", { type: "button", title: `stronger: ${word} × 2`, "aria-label": `boost ${word}`, onclick: change(2), text: "+" }),
    el("button", { type: "button", title: `remove ${word}`, "aria-label": `remove ${word}`, "data-action": "remove", onclick: remove, text: "×" }),
  );
}

async function addWord(event) {
  event.preventDefault();
  const word = $("add-word").value.trim();
  if (!word) return;
  try {
    const { words } = await api(`/api/vocab?prefix=${encodeURIComponent(word)}&limit=50`);
    if (!words.includes(word)) {
      const hint = words.length ? ` Close words: ${words.slice(0, 6).join(", ")}.` : "";
      say(`“${word}” is not in the vocabulary.${hint}`, true);
      return;
    }
  } catch (err) { say(err.message, true); return; }
  const top = Math.max(0.05, ...state.words.map((w) => w.weight));
  const existing = state.words.find((w) => w.word === word);
  if (existing) { existing.weight = top; existing.changed = true; }
  else state.words.push({ word, weight: top, group: word, changed: true });
  $("add-word").value = "";
  say(`Added “${word}” with weight ${fmt(top)}. Search again to use it.`);
  edited();
}

let completeTimer = null;
function completeWord() {
  clearTimeout(completeTimer);
  const prefix = $("add-word").value.trim();
  if (!prefix) return;
  completeTimer = setTimeout(async () => {
    try {
      const { words } = await api(`/api/vocab?prefix=${encodeURIComponent(prefix)}&limit=12`);
      $("vocab-list").replaceChildren(...words.map((w) => el("option", { value: w })));
    } catch (_) { /* autocomplete is best effort */ }
  }, 120);
}

// ------------------------------------------------------------------------------------- results
function renderResults() {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of state.results) {
    const tags = el("div", { class: "tags" },
      ...hit.words.slice(0, 4).map((w) => el("span", { class: "tag", title: `contributes ${sig(w.contribution)}`, text: w.group || w.word })));
    const card = el("button", { type: "button", class: "card", "data-doc": hit.doc, "data-testid": "result", onclick: () => selectDoc(hit.doc) },
      el("img", { src: `/api/docs/${hit.doc}/thumbnail?size=256`, alt: hit.key, loading: "lazy" }),
      el("div", { class: "meta" },
        el("div", { class: "score", text: sig(hit.score) }),
        el("div", { class: "key", title: hit.key, text: hit.metadata.caption || hit.key }),
        tags));
    card.classList.toggle("selected", hit.doc === state.selected);
    grid.append(card);
  }
  if (state.selected !== null && !state.results.some((h) => h.doc === state.selected)) closeDetail();
}

async function selectDoc(doc) {
  state.selected = doc;
  for (const card of document.querySelectorAll(".card")) card.classList.toggle("selected", Number(card.dataset.doc) === doc);
  const hit = state.results.find((h) => h.doc === doc);
  $("detail").hidden = false;
  $("detail-title").textContent = hit ? hit.metadata.caption || hit.key : `document ${doc}`;
  $("detail-image").src = `/api/docs/${doc}/thumbnail?size=512`;
  $("explanation").replaceChildren();
  $("doc-cloud").replaceChildren();
  clearCanvas($("detail-heatmap"));
  $("heatmap-caption").textContent = "Computing the patches the query selects…";
  state.groundedWord = null;
  const words = queryWords();
  const [explanation, heat] = await Promise.allSettled([
    postJSON("/api/explain", { doc, words, k: 12 }),
    postJSON("/api/grounding", { doc, words }),
  ]);
  if (state.selected !== doc) return;
  if (explanation.status === "fulfilled") renderExplanation(explanation.value);
  else say(explanation.reason.message, true);
  if (heat.status === "fulfilled") renderHeatmap(heat.value);
  else $("heatmap-caption").textContent = heat.reason.message;
}

const queryWords = () => Object.fromEntries(state.words.map((w) => [w.word, w.weight]));

// Light up the patches of one query word (click it again for the whole query).
async function groundWord(word) {
  const doc = state.selected;
  state.groundedWord = state.groundedWord === word ? null : word;
  for (const li of $("explanation").children) li.classList.toggle("active", li.dataset.word === state.groundedWord);
  const words = state.groundedWord ? { [word]: queryWords()[word] || 1 } : queryWords();
  try {
    const heat = await postJSON("/api/grounding", { doc, words });
    if (state.selected === doc) renderHeatmap(heat);
  } catch (err) { $("heatmap-caption").textContent = err.message; }
}

function renderExplanation(ex) {
  $("detail-score").textContent = `score ${sig(ex.score)} = Σ query × image`;
  const top = Math.max(1e-12, ...ex.words.map((w) => w.contribution));
  $("explanation").replaceChildren(...ex.words.map((w) =>
    el("li", { "data-testid": "contribution", "data-word": w.word, onclick: () => groundWord(w.word),
               title: `query ${fmt(w.query_weight)} × image ${fmt(w.doc_weight)}; click to see its patches` },
      el("span", { class: "word", text: w.word }),
      el("span", { class: "bar", style: `width:${(100 * w.contribution) / top}%` }),
      el("span", { class: "value", text: sig(w.contribution) }))));
  const rest = [];
  if (ex.shared_words > ex.words.length) rest.push(`${ex.shared_words - ex.words.length} more shared words add ${sig(ex.remainder)}.`);
  if (!ex.words.length) rest.push("No query word is among this image's words.");
  if (ex.missing.length) rest.push(`Query words this image lacks: ${ex.missing.join(", ")}.`);
  $("explanation-rest").textContent = rest.join(" ");
  cloud($("doc-cloud"), ex.doc_words);
}

function cloud(target, words) {
  const top = Math.max(1e-12, ...words.map((w) => w.weight));
  target.replaceChildren(...words.map((w) => {
    const r = w.weight / top;
    return el("span", { title: fmt(w.weight), style: `font-size:${(0.8 + 0.8 * r * r).toFixed(2)}rem;opacity:${(0.5 + 0.5 * r).toFixed(2)}`, text: w.word });
  }));
}

// ------------------------------------------------------------------------------------- heatmaps
function clearCanvas(canvas) {
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function sizeCanvas(canvas, img) {
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  canvas.style.height = `${img.clientHeight}px`;
}

function whenLoaded(img, fn) {
  if (img.complete && img.naturalWidth) fn();
  else img.addEventListener("load", fn, { once: true });
}

let lastHeat = null;
function renderHeatmap(heat) {
  lastHeat = heat;
  const img = $("detail-image");
  whenLoaded(img, () => drawSpotlight($("detail-heatmap"), img, heat));
  const strongest = heat.words.flat().filter(Boolean);
  const counts = {};
  for (const w of strongest) counts[w] = (counts[w] || 0) + 1;
  const common = Object.entries(counts).sort((a, b) => b[1] - a[1]).slice(0, 4).map(([w]) => w);
  const what = state.groundedWord ? `“${state.groundedWord}”` : "the query";
  $("heatmap-caption").textContent = heat.max > 0
    ? `Bright patches match ${what} most (${heat.rows}×${heat.cols} patches)` +
      (state.groundedWord ? "." : `; they mostly match: ${common.join(", ")}.`)
    : `No patch shares a word with ${what}.`;
}

// Dim the patches the query does not select; the browser's smoothing softens the grid.
function drawSpotlight(canvas, img, heat) {
  sizeCanvas(canvas, img);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!$("show-heatmap").checked || heat.max <= 0) return;
  const small = document.createElement("canvas");
  small.width = heat.cols;
  small.height = heat.rows;
  const sctx = small.getContext("2d");
  for (let r = 0; r < heat.rows; r++) {
    for (let c = 0; c < heat.cols; c++) {
      const v = Math.max(0, heat.scores[r][c]) / heat.max;
      sctx.fillStyle = `rgba(20, 24, 28, ${(0.72 * (1 - v)).toFixed(3)})`;
      sctx.fillRect(c, r, 1, 1);
    }
  }
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function closeDetail() {
  state.selected = null;
  $("detail").hidden = true;
  for (const card of document.querySelectorAll(".card")) card.classList.remove("selected");
}

// ------------------------------------------------------------------------------------- inspect
async function inspectImage(file) {
  if (!file) return;
  state.inspectFile = file;
  $("inspect-result").hidden = true;
  say(`Reading ${file.name}…`, false, "inspect-message");
  const form = new FormData();
  form.append("file", file);
  try {
    const body = await api("/api/describe", { method: "POST", body: form });
    const img = $("inspect-preview");
    img.src = URL.createObjectURL(file);
    $("inspect-result").hidden = false;
    $("inspect-search").hidden = false;
    cloud($("image-cloud"), body.words);
    whenLoaded(img, () => drawPatchGrid($("inspect-grid"), img, body));
    say(`${body.words.length} image words; ${body.rows}×${body.cols} patches.`, false, "inspect-message");
  } catch (err) {
    say(err.message, true, "inspect-message");
  }
}

function drawPatchGrid(canvas, img, body, active = null) {
  sizeCanvas(canvas, img);
  const ctx = canvas.getContext("2d");
  const w = canvas.width / body.cols, h = canvas.height / body.rows;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  for (let r = 0; r < body.rows; r++) {
    for (let c = 0; c < body.cols; c++) {
      ctx.strokeStyle = `rgba(255, 255, 255, ${w >= 44 ? 0.55 : 0.22})`;
      ctx.lineWidth = 1;
      ctx.strokeRect(c * w + 0.5, r * h + 0.5, w - 1, h - 1);
      const top = body.patches[r][c][0];
      if (top && w >= 44) {
        ctx.fillStyle = "rgba(20, 24, 28, 0.6)";
        const tw = Math.min(w - 4, ctx.measureText(top.word).width + 8);
        ctx.fillRect(c * w + (w - tw) / 2, r * h + h / 2 - 9, tw, 18);
        ctx.fillStyle = "#fff";
        ctx.fillText(top.word, c * w + w / 2, r * h + h / 2, w - 6);
      }
    }
  }
  if (active) { // the hovered patch: a clear outline
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = 3;
    ctx.strokeRect(active[1] * w + 1.5, active[0] * h + 1.5, w - 3, h - 3);
    ctx.strokeStyle = "#2f6b6f";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(active[1] * w + 1.5, active[0] * h + 1.5, w - 3, h - 3);
  }
  canvas.onmousemove = (event) => {
    const rect = canvas.getBoundingClientRect();
    const c = Math.min(body.cols - 1, Math.floor(((event.clientX - rect.left) / rect.width) * body.cols));
    const r = Math.min(body.rows - 1, Math.floor(((event.clientY - rect.top) / rect.height) * body.rows));
    const words = body.patches[r][c].map((p) => `${p.word} ${fmt(p.weight)}`).join(" · ");
    $("patch-words").textContent = `Patch row ${r + 1}, column ${c + 1}: ${words || "no word"}`;
    drawPatchGrid(canvas, img, body, [r, c]);
  };
}

// ------------------------------------------------------------------------------------- wiring
function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("tab-search").hidden = name !== "search";
  $("tab-inspect").hidden = name !== "inspect";
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    const model = info.model && info.model.name ? ` · model ${info.model.name}` : "";
    $("info").textContent = `${info.documents} images · ${info.vocab_size} words in the vocabulary${model}`;
  } catch (err) {
    $("info").textContent = `The server did not answer: ${err.message}`;
  }
}

function init() {
  $("search-form").addEventListener("submit", searchText);
  $("query-image").addEventListener("change", (e) => { searchImage(e.target.files[0]); e.target.value = ""; });
  $("research").addEventListener("click", searchWords);
  $("reset-query").addEventListener("click", () => {
    state.words = state.original.map((w) => ({ ...w }));
    $("reset-query").disabled = true;
    $("research").disabled = false;
    renderQuery();
  });
  $("more-words").addEventListener("click", () => { state.showAllWords = !state.showAllWords; renderQuery(); });
  $("add-form").addEventListener("submit", addWord);
  $("add-word").addEventListener("input", completeWord);
  $("close-detail").addEventListener("click", closeDetail);
  $("show-heatmap").addEventListener("change", () => { if (lastHeat) renderHeatmap(lastHeat); });
  $("inspect-image").addEventListener("change", (e) => { inspectImage(e.target.files[0]); e.target.value = ""; });
  $("inspect-search").addEventListener("click", () => { showTab("search"); searchImage(state.inspectFile); });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  window.addEventListener("resize", () => { if (lastHeat && !$("detail").hidden) renderHeatmap(lastHeat); });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
