"use strict";
// The upload page: pick a model, send images to /predict one request per image, show the top classes.
const $ = (sel) => document.querySelector(sel);
let models = [];
// Whether the server stores corrections (IMGSERVE_FEEDBACK_DIR): a promise, since an answer can come back first
let feedbackOn = Promise.resolve(false);

const MESSAGES = {
  413: "This image is too large for the server.",
  415: "This file is not an image the server can read (use JPEG, PNG, WebP or BMP).",
  400: "The server could not read this image.",
  429: "The server is busy right now. Try again in a moment.",
  503: "The server is not ready (starting up or shutting down). Try again shortly.",
  504: "The server took too long to answer. Try again.",
  404: "That model or version is not available.",
};

async function loadModels() {
  try {
    const r = await fetch("/v1/models");
    const body = await r.json();
    models = (body.models || []).filter((m) => m.served_version !== null);
  } catch (e) {
    models = [];
  }
  const sel = $("#model");
  sel.innerHTML = "";
  for (const m of models) sel.add(new Option(m.name, m.name));
  $("#model-status").textContent = models.length ? "" : "No model is being served yet.";
  fillVersions();
}

function fillVersions() {
  const m = models.find((x) => x.name === $("#model").value);
  const sel = $("#version");
  sel.innerHTML = "";
  if (!m) return;
  for (const v of m.versions.filter((v) => v.state === "AVAILABLE")) {
    sel.add(new Option(`${v.version}`, v.version));
  }
  const link = $("#report-link");
  link.href = `/v1/models/${encodeURIComponent(m.name)}/versions/${m.served_version}/report/report.md`;
  link.hidden = false;
}

function card(file) {
  const node = $("#card").content.firstElementChild.cloneNode(true);
  node.querySelector("img").src = URL.createObjectURL(file);
  node.querySelector("img").alt = `thumbnail of ${file.name}`;
  node.querySelector("img").addEventListener("error", (e) => { e.target.hidden = true; });
  node.querySelector(".name").textContent = file.name || "pasted image";
  node.querySelector(".meta").textContent = "classifying…";
  $("#results").prepend(node);
  return node;
}

function showError(node, status, body) {
  const err = node.querySelector(".error");
  err.textContent = MESSAGES[status] || `The server answered ${status}.`;
  if (body && body.error) {
    const small = document.createElement("small");
    small.textContent = `Server: ${body.error}`;
    err.append(small);
  }
  err.hidden = false;
  node.querySelector(".meta").textContent = "";
  node.classList.add("failed");
}

async function classify(file) {
  const node = card(file);
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  const params = new URLSearchParams({ top_k: $("#topk").value || "5" });
  if ($("#model").value) params.set("model", $("#model").value);
  if ($("#version").value) params.set("version", $("#version").value);
  const t0 = performance.now();
  let r, body;
  try {
    r = await fetch(`/predict?${params}`, { method: "POST", body: form });
    body = await r.json().catch(() => null);
  } catch (e) {
    showError(node, 0, { error: "the server could not be reached" });
    return;
  }
  const ms = Math.round(performance.now() - t0);
  if (!r.ok) {
    showError(node, r.status, body);
    return;
  }
  const role = r.headers.get("X-Model-Role");  // stable, canary, or a version asked for by number or label
  node.querySelector(".meta").textContent = `${body.model} v${body.version}${role ? ` (${role})` : ""} · ${ms} ms`;
  const list = node.querySelector(".bars");
  for (const t of body.predictions[0].top) {
    const li = document.createElement("li");
    li.className = "bar";
    const pct = (t.score * 100).toFixed(1);
    li.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span></span><span class="pct"></span>';
    li.querySelector(".label").textContent = t.label;
    li.querySelector(".fill").style.width = `${pct}%`;
    li.querySelector(".pct").textContent = `${pct}%`;
    li.setAttribute("aria-label", `${t.label}: ${pct} percent`);
    list.append(li);
  }
  if (await feedbackOn) offerCorrection(node, file, body);
}

// Next to each answer: the right class, sent to /v1/feedback with the photo, stored for the next training run.
function offerCorrection(node, file, body) {
  const form = node.querySelector(".feedback");
  const m = models.find((x) => x.name === body.model);
  const sel = form.querySelector("select");
  for (const label of (m && m.labels) || []) sel.add(new Option(label, label));
  sel.value = body.predictions[0].top[0].label;
  form.hidden = false;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = new FormData();
    data.append("file", file, file.name || "pasted.png");
    data.append("label", sel.value);
    data.append("model", body.model);
    const sent = form.querySelector(".sent");
    sent.textContent = "sending…";
    try {
      const r = await fetch("/v1/feedback", { method: "POST", body: data });
      const answer = await r.json().catch(() => null);
      sent.textContent = r.ok ? `Saved as ${answer.label}: the next training run learns from it.`
        : `Not saved: ${(answer && answer.error) || `the server answered ${r.status}`}`;
    } catch (err) {
      sent.textContent = "Not saved: the server could not be reached.";
    }
  });
}

async function loadFeedbackStatus() {
  try {
    return (await (await fetch("/v1/feedback")).json()).enabled === true;
  } catch (e) {
    return false;
  }
}

function handle(files) {
  for (const f of files) classify(f);
}

$("#files").addEventListener("change", (e) => { handle(e.target.files); e.target.value = ""; });
$("#model").addEventListener("change", fillVersions);
const drop = $("#drop");
// Enter and Space open the file chooser; on keyup, as a button does: Chromium shows no chooser from a keydown of Enter
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") e.preventDefault(); });
drop.addEventListener("keyup", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#files").click(); } });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handle(e.dataTransfer.files); });
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData || {}).items || []].filter((i) => i.kind === "file").map((i) => i.getAsFile());
  handle(files);
});
loadModels();
feedbackOn = loadFeedbackStatus();
