// The i2v-daemon page: a snapshot from /api/v1/jobs, then live from /api/v1/events (server-sent events).
// Every request goes to this origin with the HttpOnly cookie; nothing is loaded from anywhere else.
"use strict";

const API = "api/v1/";
const RESULTS = 24;
// The API's own words: the five statuses of GET /api/v1/jobs?status= (a job whose files are still
// arriving is "queued" there too). The page asks with these and nothing else.
const STATUS = { queued: "queued", running: "running", succeeded: "succeeded", failed: "failed", canceled: "canceled" };
const ACTIVE = [STATUS.queued, STATUS.running];
const FINISHED = [STATUS.succeeded, STATUS.failed, STATUS.canceled];
const STALE_MS = 10000; // a running job silent this long is asked about again (its worker may be gone)
const jobs = new Map(); // id -> the job's `status --json` entry
const seenAt = new Map(); // id -> when its entry arrived
const details = new Map(); // id -> GET /jobs/{id} (prompt, phase, step, eta), with the time it arrived
const cards = new Map(); // id -> its result card, kept so a playing <video> is never rebuilt
let touched = null; // ids changed by events while a snapshot is on its way
let snapshotError = null; // why the first look at the queue failed, shown instead of "empty"
let source = null;
window.__i2vLoadedAt = Date.now(); // tests check it: the page updates itself without a reload

const $ = (id) => document.getElementById(id);

// Text from file names, prompts and errors, with what would act on the text around it made visible:
// controls, and the bidi overrides and isolates that can make "cat\u202egnp.exe" read "catexe.png".
// Written as `status` and `show` write it (\u202e). Joiners stay: emoji and some scripts need them.
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu;
const KEPT = new Set(["\t", "\n", "\r", "\u200c", "\u200d"]); // white space in HTML; the joiners
function visible(text) {
  if (text === null || text === undefined) return text;
  return String(text).replace(INVISIBLE, (c) => {
    if (KEPT.has(c)) return c;
    const n = c.codePointAt(0);
    return n < 0x100 ? `\\x${hex(n, 2)}` : n < 0x10000 ? `\\u${hex(n, 4)}` : `\\U${hex(n, 8)}`;
  });
}
const hex = (n, width) => n.toString(16).padStart(width, "0");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

class ApiFailure extends Error {}

async function api(path, options) {
  const response = await fetch(API + path, { credentials: "same-origin", ...options });
  if (response.status === 401) signedOut();
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiFailure(body?.error?.message || `${response.status} ${response.statusText}`);
  return body;
}

function signedOut() {
  $("signed-out").hidden = false;
  setLive("closed", "signed out");
  if (source) source.close();
}

function setLive(state, text) {
  const live = $("live");
  live.dataset.state = state;
  live.textContent = text;
}

// ---- state ------------------------------------------------------------------------------------

async function snapshot() {
  touched = new Set();
  try {
    const [recent, active] = await Promise.all([
      api(`jobs?limit=${RESULTS}&status=${FINISHED.join(",")}`),
      api(`jobs?limit=200&status=${ACTIVE.join(",")}`),
    ]);
    for (const job of [...recent.jobs, ...active.jobs]) if (!touched.has(job.id)) remember(job);
    renderCounts(recent.counts);
    snapshotError = null;
  } catch (err) {
    snapshotError = err.message; // never "the queue is empty" when it could not be read
    throw err;
  } finally {
    touched = null;
    render();
  }
}

function remember(job) {
  const before = jobs.get(job.id);
  jobs.set(job.id, job);
  seenAt.set(job.id, Date.now());
  if (!before || before.status !== job.status || job.status === STATUS.running) refreshDetail(job.id);
}

const inFlight = new Set();
const again = new Set();

async function refreshDetail(id) {
  // One request per job at a time; a change that arrives meanwhile asks once more afterwards.
  if (inFlight.has(id)) return again.add(id);
  inFlight.add(id);
  try {
    details.set(id, { ...(await api(`jobs/${id}`)), receivedAt: Date.now() });
  } catch (err) {
    if (!(err instanceof ApiFailure)) throw err;
  } finally {
    inFlight.delete(id);
  }
  if (again.delete(id)) return refreshDetail(id);
  render();
}

// ---- rendering ------------------------------------------------------------------------------------

let pending = false;
function render() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    renderRunning();
    renderQueue();
    renderResults();
  });
}

function renderCounts(counts) {
  for (const li of $("counts").children) {
    const n = counts[li.dataset.status] || 0;
    li.querySelector("b").textContent = n;
    li.classList.toggle("zero", n === 0);
  }
}

function renderSummary(summary) {
  renderCounts(summary.counts);
  $("paused").hidden = !summary.paused;
  if (summary.paused) {
    const since = summary.paused_since ? ` since ${new Date(summary.paused_since).toLocaleString()}` : "";
    $("paused-text").textContent = `No new job starts${since}${summary.paused_by ? ` (by ${summary.paused_by})` : ""}; a running job finishes.`;
  }
}

function sorted(filter, compare) {
  return [...jobs.values()].filter(filter).sort(compare);
}

function size(job) {
  const d = details.get(job.id);
  const w = job.width || d?.requested?.width, h = job.height || d?.requested?.height;
  const frames = job.num_frames ? `${job.num_frames} frames` : "";
  return [w && h ? `${w}×${h}` : "", frames].filter(Boolean).join(", ");
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// Seconds since a running job's lease ran out (its worker was killed or hangs), from whichever of its
// entry and its detail arrived last, counted on from then; null while its worker is heard from.
function leaseExpired(job, d) {
  const fromEntry = [job.lease_expired_seconds, seenAt.get(job.id) || 0];
  const fromDetail = [d.lease_expired_seconds, d.receivedAt || 0];
  const [late, at] = fromDetail[1] > fromEntry[1] ? fromDetail : fromEntry;
  return late === null || late === undefined ? null : late + (Date.now() - at) / 1000;
}

function renderRunning() {
  const running = sorted((j) => j.status === STATUS.running, (a, b) => a.id - b.id);
  const box = $("running");
  if (!running.length) return box.replaceChildren(el("p", { class: "empty", text: "Nothing is running." }));
  box.replaceChildren(...running.map((job) => {
    const d = details.get(job.id) || {};
    const pct = Math.round((job.progress || 0) * 100);
    const gone = leaseExpired(job, d);
    const eta = gone === null && d.eta_seconds !== null && d.eta_seconds !== undefined
      ? d.eta_seconds - (Date.now() - d.receivedAt) / 1000 : null;
    const step = d.total_steps ? `step ${d.step}/${d.total_steps}` : "";
    const note = gone !== null
      ? el("span", { class: "eta orphaned", text: `worker gone, lease expired ${duration(gone)} ago; it will be taken again` })
      : el("span", { class: "eta", text: eta !== null ? `about ${duration(eta)} left` : "" });
    return el("article", { class: gone !== null ? "running orphaned" : "running", "data-job": job.id },
      el("div", { class: "row" }, el("strong", { class: "name", text: `#${job.id} ${visible(job.name)}` }),
        el("button", { class: "link", type: "button", text: "cancel", onclick: () => act(job.id, "cancel") })),
      el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct },
        fill(pct)),
      el("div", { class: "meta" },
        el("span", { class: "phase", text: d.phase || "starting" }), el("span", { class: "step", text: step }),
        el("span", { text: `${pct}%` }), el("span", { text: size(job) }), note),
      d.prompt ? el("p", { class: "prompt", dir: "auto", text: visible(d.prompt) }) : null);
  }));
}

function askAboutSilentJobs() {
  // No event for a while from a running job: its worker may be gone (a lease runs out without an
  // event), so ask the API, which says so (lease_expired_seconds).
  const now = Date.now();
  for (const job of jobs.values()) {
    if (job.status !== STATUS.running) continue;
    const heard = Math.max(seenAt.get(job.id) || 0, details.get(job.id)?.receivedAt || 0);
    if (now - heard > STALE_MS) refreshDetail(job.id);
  }
}

function fill(pct) {
  const span = el("span");
  span.style.width = `${pct}%`; // through the CSSOM: the CSP refuses style attributes
  return span;
}

function showEmpty(id, empty, text) {
  const note = $(id);
  note.hidden = !empty && !snapshotError;
  note.classList.toggle("error", !!snapshotError);
  note.textContent = snapshotError ? `Could not load the jobs: ${snapshotError}` : text;
}

function renderQueue() {
  const queued = sorted((j) => j.status === STATUS.queued,
    (a, b) => (b.priority || 0) - (a.priority || 0) || a.id - b.id);
  showEmpty("queue-empty", queued.length === 0, "The queue is empty.");
  $("queue-count").textContent = queued.length ? `(${queued.length})` : "";
  $("queue").replaceChildren(...queued.map((job) => {
    const d = details.get(job.id) || {};
    return el("li", { "data-job": job.id },
      el("div", { class: "row" }, el("strong", { class: "name", text: `#${job.id} ${visible(job.name)}` }),
        el("span", { class: "muted", text: [visible(d.requested?.preset), job.priority ? `priority ${job.priority}` : ""].filter(Boolean).join(" · ") }),
        el("button", { class: "link", type: "button", text: "cancel", onclick: () => act(job.id, "cancel") })),
      d.prompt ? el("p", { class: "prompt", dir: "auto", text: visible(d.prompt) }) : null);
  }));
}

function renderResults() {
  const done = sorted((j) => FINISHED.includes(j.status),
    (a, b) => (b.finished_at || "").localeCompare(a.finished_at || "") || b.id - a.id).slice(0, RESULTS);
  showEmpty("results-empty", done.length === 0, "No finished job yet.");
  const wanted = new Set(done.map((j) => j.id));
  for (const [id, card] of cards) if (!wanted.has(id)) { card.remove(); cards.delete(id); }
  done.forEach((job, i) => {
    let card = cards.get(job.id);
    if (!card || card.dataset.status !== job.status) {
      const fresh = resultCard(job);
      if (card) card.replaceWith(fresh);
      card = fresh;
      cards.set(job.id, card);
    }
    fillCaption(card, job);
    const grid = $("results");
    if (grid.children[i] !== card) grid.insertBefore(card, grid.children[i] || null);
  });
}

function resultCard(job) {
  const media = job.status === "succeeded"
    ? el("video", { controls: true, preload: "none", playsinline: true, poster: `${API}jobs/${job.id}/poster`,
      src: `${API}jobs/${job.id}/video` })
    : el("div", { class: "no-video" }, el("span", { text: job.status }));
  return el("article", { class: `result ${job.status}`, "data-job": job.id, "data-status": job.status },
    el("div", { class: "media" }, media), el("div", { class: "caption" }));
}

function fillCaption(card, job) {
  const d = details.get(job.id) || {};
  const when = job.finished_at ? new Date(job.finished_at).toLocaleString() : "";
  const links = [el("a", { href: `${API}jobs/${job.id}/log`, target: "_blank", text: "log" })];
  if (job.status === "succeeded") links.unshift(el("a", { href: `${API}jobs/${job.id}/video`, download: "", text: "download" }));
  else if (d.error_detail?.type !== "invalid_input") { // a rejected input is fixed by sending it again, not retried
    links.push(el("button", { class: "link", type: "button", text: "retry", onclick: () => act(job.id, "retry") }));
  }
  card.querySelector(".caption").replaceChildren(...present(
    el("div", { class: "row" }, el("strong", { class: "name", text: `#${job.id} ${visible(job.name)}` }),
      el("span", { class: `badge ${job.status}`, text: job.status })),
    d.prompt ? el("p", { class: "prompt", dir: "auto", title: visible(d.prompt), text: visible(d.prompt) }) : null,
    job.error ? el("p", { class: "error", dir: "auto", text: visible(job.error) }) : null,
    el("div", { class: "meta" }, el("span", { text: size(job) }), el("span", { text: when })),
    el("div", { class: "links" }, ...links)));
}

function present(...nodes) {
  return nodes.filter((n) => n !== null && n !== undefined);
}

async function act(id, what) {
  try {
    const job = await api(`jobs/${id}/${what}`, { method: "POST" });
    flash(`#${id}: ${job.message || what}`);
  } catch (err) {
    flash(err.message, true);
  }
}

function flash(text, bad) {
  const msg = $("form-msg");
  msg.textContent = visible(text);
  msg.classList.toggle("bad", !!bad);
}

// ---- the form -----------------------------------------------------------------------------------

async function loadPresets() {
  const { default: chosen, presets } = await api("presets");
  $("f-preset").replaceChildren(...Object.entries(presets).map(([name, p]) =>
    el("option", { value: name, selected: name === chosen,
      text: `${name}: ${p.resolution} px, ${p.num_frames} frames, ${p.steps} steps` })));
}

let idempotencyKey = null; // one per filled-in form: a retried click never makes a second job

async function submitForm(event) {
  event.preventDefault();
  const form = event.target;
  const file = form.image.files[0];
  if (!file) return flash("Choose an image first.", true);
  idempotencyKey = idempotencyKey || (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`);
  const body = new FormData();
  body.append("image", file, file.name);
  body.append("params", JSON.stringify({ prompt: form.prompt.value, preset: form.preset.value }));
  $("f-send").disabled = true;
  flash("Sending…");
  try {
    const job = await api("jobs", { method: "POST", body, headers: { "Idempotency-Key": idempotencyKey } });
    flash(`Queued as #${job.id} (${job.name}).`);
    idempotencyKey = null;
    form.image.value = "";
    form.prompt.value = "";
    if (!jobs.has(job.id)) refreshDetail(job.id).then(() => { const d = details.get(job.id); if (d && !jobs.has(job.id)) remember(d); });
  } catch (err) {
    flash(err.message, true);
  } finally {
    $("f-send").disabled = false;
  }
}

// ---- live updates -----------------------------------------------------------------------------------

function connect() {
  let reconnecting = false;
  source = new EventSource(API + "events");
  source.addEventListener("open", () => {
    setLive("live", "live");
    if (reconnecting) snapshot(); // what changed while away, beyond what Last-Event-ID replays
    reconnecting = false;
  });
  source.addEventListener("job", (e) => {
    const job = JSON.parse(e.data);
    if (touched) touched.add(job.id);
    remember(job);
    render();
  });
  source.addEventListener("summary", (e) => renderSummary(JSON.parse(e.data)));
  source.addEventListener("error", () => {
    reconnecting = true;
    if (source.readyState === EventSource.CLOSED) {
      setLive("closed", "disconnected");
      api("presets").then(() => setTimeout(connect, 3000), () => {}); // 401 shows the sign-in banner
    } else {
      setLive("reconnecting", "reconnecting…");
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("submit-form").addEventListener("submit", submitForm);
  connect();
  loadPresets().catch((err) => flash(err.message, true));
  snapshot().catch((err) => flash(err.message, true));
  setInterval(() => {
    if (![...jobs.values()].some((j) => j.status === STATUS.running)) return;
    askAboutSilentJobs();
    renderRunning();
  }, 1000);
});
