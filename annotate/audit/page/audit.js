// The review page: one figure at a time, every run's overlays side by side, answered with the keyboard.
// Each finished figure is POSTed once to /api/verdict; the server's answer says which figure is next.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0"];
const KEYS = { c: "correct", 1: "correct", w: "wrong", 2: "wrong", u: "unsure", 3: "unsure" };
const ASPECT_NAMES = { panels: "Panels", labels: "Labels", caption_split: "Caption split", regions: "Regions" };
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

const state = { info: null, reviewer: "", figure: null, answers: {}, cursor: { run: 0, aspect: 0 }, busy: false };

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, attributes = {}, text = "") {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;  // textContent: captions and texts are untrusted, never HTML
  return node;
}

function overlay(run) {
  const svg = el("svg:svg", { viewBox: `0 0 ${run.width} ${run.height}`, preserveAspectRatio: "none" });
  const size = Math.max(12, run.width / 35);
  for (const panel of run.panels) {
    const [x0, y0, x1, y1] = panel.box, colour = COLOURS[panel.panel_id % COLOURS.length];
    svg.append(el("svg:rect", { class: "panel", x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: colour }));
    svg.append(el("svg:text", { x: x0 + size / 3, y: y0 + size, fill: colour, "font-size": size }, panel.label || "?"));
  }
  for (const region of run.regions) {
    const [x0, y0, x1, y1] = region.box;
    svg.append(el("svg:rect", { class: "region", x: x0, y: y0, width: x1 - x0, height: y1 - y0 }));
    if (region.marker_box) {
      const [m0, n0, m1, n1] = region.marker_box;
      svg.append(el("svg:rect", { class: "marker", x: m0, y: n0, width: m1 - m0, height: n1 - n0 }));
    }
  }
  return svg;
}

function runColumn(run, r) {
  const section = el("section", { class: "run", "data-run": run.name });
  section.append(el("h2", {}, `${run.name}: ${run.panels.length} panel(s), ${run.regions.length} region(s)`));
  const figure = el("div", { class: "figure" });
  figure.append(el("img", { src: `/image/${state.figure.index}/${encodeURIComponent(run.name)}`, alt: state.figure.id }),
                overlay(run));
  section.append(figure);
  section.append(el("h3", {}, "Caption split"));
  const split = el("ul", { class: "split" });
  for (const panel of run.panels) {
    const item = el("li");
    item.append(el("b", {}, panel.label || "—"), document.createTextNode(` ${panel.text || "(no text)"}`));
    split.append(item);
  }
  section.append(split);
  if (run.regions.length) {
    section.append(el("h3", {}, "Regions"));
    const regions = el("ul", { class: "regions" });
    for (const region of run.regions) regions.append(el("li", {}, `${region.kind} (${region.source}): ${region.text || "(no text)"}`));
    section.append(regions);
  }
  if (run.warnings.length) section.append(el("p", { class: "warnings" }, run.warnings.join(" · ")));
  const table = el("table", { class: "answers" });
  state.info.aspects.forEach((aspect, a) => {
    const row = el("tr", { "data-aspect": aspect });
    row.append(el("td", {}, ASPECT_NAMES[aspect]));
    for (const answer of state.info.answers) {
      const cell = el("td"), button = el("button", { type: "button", class: answer, "data-answer": answer }, answer);
      button.addEventListener("click", () => { state.cursor = { run: r, aspect: a }; answerCursor(answer); });
      cell.append(button);
      row.append(cell);
    }
    table.append(row);
  });
  section.append(table);
  return section;
}

function paint() {
  state.info.runs.forEach((run, r) => {
    const rows = document.querySelectorAll(`.run[data-run="${CSS.escape(run)}"] tr`);
    rows.forEach((row, a) => {
      row.classList.toggle("cursor", r === state.cursor.run && a === state.cursor.aspect);
      for (const button of row.querySelectorAll("button"))
        button.classList.toggle("on", state.answers[run][row.dataset.aspect] === button.dataset.answer);
    });
  });
}

function unanswered() {
  const cells = [];
  state.info.runs.forEach((run, r) => state.info.aspects.forEach((aspect, a) => {
    if (!state.answers[run][aspect]) cells.push({ run: r, aspect: a });
  }));
  return cells;
}

function answerCursor(answer) {
  const run = state.info.runs[state.cursor.run], aspect = state.info.aspects[state.cursor.aspect];
  state.answers[run][aspect] = answer;
  // Reading order: the aspects of a run, then the next run; then the first question still open.
  const order = [];
  state.info.runs.forEach((_, r) => state.info.aspects.forEach((_, a) => order.push({ run: r, aspect: a })));
  const here = order.findIndex((c) => c.run === state.cursor.run && c.aspect === state.cursor.aspect);
  const open = unanswered();
  const after = order.slice(here + 1).find((c) => open.some((o) => o.run === c.run && o.aspect === c.aspect));
  state.cursor = after || open[0] || state.cursor;
  paint();
  status(open.length ? "" : "all answered: Enter saves");
}

async function show(k) {
  if (k < 0 || k >= state.info.total) return;
  state.busy = true;
  try {
    const figure = await getJSON(`/api/figure/${k}?reviewer=${encodeURIComponent(state.reviewer)}`);
    state.figure = figure;
    state.answers = {};
    for (const run of state.info.runs)
      state.answers[run] = figure.verdict ? { ...figure.verdict.answers[run] } : {};
    state.cursor = { run: 0, aspect: 0 };
    $("figure-id").textContent = `${figure.id} (figure ${k + 1} of ${state.info.total})`;
    $("caption").textContent = figure.caption || "(no caption)";
    $("stratum").textContent = `stratum: ${figure.stratum.panels} panel(s), ${figure.stratum.kind}, ${figure.stratum.source}`;
    $("note").value = figure.verdict ? figure.verdict.note : "";
    $("runs").replaceChildren(...figure.runs.map(runColumn));
    $("finished").hidden = true;
    paint();
    status(figure.verdict ? "judged before: saving again replaces it" : "");
    document.body.dataset.index = String(k);
  } catch (error) {
    status(error.message, true);
  } finally {
    state.busy = false;
  }
}

function progress(body) {
  $("progress").textContent = `${body.done} of ${body.total} done by ${state.reviewer}`;
  document.body.dataset.done = String(body.done);
}

async function resume() {
  if (!state.reviewer) {
    $("reviewer").focus();
    status("type your name and press Enter", true);
    return;
  }
  const body = await getJSON(`/api/next?reviewer=${encodeURIComponent(state.reviewer)}`);
  progress(body);
  if (body.next === null) finished();
  else await show(body.next);
}

function finished() {
  $("runs").replaceChildren();
  $("finished").hidden = false;
  document.body.dataset.index = "done";
}

async function save() {
  if (state.busy || !state.figure) return;
  const open = unanswered();
  if (open.length) {
    state.cursor = open[0];
    paint();
    status(`${open.length} question(s) still open`, true);
    return;
  }
  state.busy = true;
  try {
    const body = await getJSON("/api/verdict", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reviewer: state.reviewer, figure: state.figure.id, answers: state.answers,
                             note: $("note").value }),
    });
    progress(body);
    if (body.next === null) finished();
    else await show(body.next);
    status(`saved ${body.saved.figure}`);
  } catch (error) {
    status(error.message, true);
  } finally {
    state.busy = false;
  }
}

function onKey(event) {
  const typing = event.target.matches("input, textarea");
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    if (event.key === "Enter" && event.target.id === "reviewer") {
      event.preventDefault();
      setReviewer(event.target.value);
    }
    return;
  }
  if (state.busy || !state.figure || event.ctrlKey || event.metaKey || event.altKey) return;
  const runs = state.info.runs.length, aspects = state.info.aspects.length;
  const moves = { ArrowUp: [0, -1], ArrowDown: [0, 1], ArrowLeft: [-1, 0], ArrowRight: [1, 0] };
  if (event.key in KEYS) answerCursor(KEYS[event.key]);
  else if (event.key in moves) {
    const [dr, da] = moves[event.key];
    state.cursor = { run: (state.cursor.run + dr + runs) % runs, aspect: (state.cursor.aspect + da + aspects) % aspects };
    paint();
  } else if (event.key === "n") $("note").focus();
  else if (event.key === "Enter") save();
  else if (event.key === "[") show(state.figure.index - 1);
  else if (event.key === "]") show(state.figure.index + 1);
  else return;
  event.preventDefault();
}

function setReviewer(name) {
  state.reviewer = name.trim();
  $("reviewer").value = state.reviewer;
  localStorage.setItem("audit-reviewer", state.reviewer);
  $("reviewer").blur();
  resume().catch((error) => status(error.message, true));
}

async function start() {
  state.info = await getJSON("/api/sample");
  document.addEventListener("keydown", onKey);
  $("save").addEventListener("click", save);
  $("reviewer").addEventListener("change", (event) => {
    if (event.target.value.trim() !== state.reviewer) setReviewer(event.target.value);
  });
  const asked = new URLSearchParams(location.search).get("reviewer");
  setReviewer(asked || localStorage.getItem("audit-reviewer") || "");
}

start().catch((error) => status(error.message, true));
