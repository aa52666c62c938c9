// ossimport web UI: job cards, a New job form, job detail with Retry, dataflows.
// Talks only to the JSON door (POST /api/<Action>) and the event stream (GET /api/events).
// Every text from the server goes into the page as text (textContent), never as HTML.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
// no token: the service has no credentials, so there is no login to end
document.getElementById("signout").hidden = !csrf;
const OBJECT = ["oss", "s3", "cos", "obs", "bos", "ks3", "qiniu", "ufile", "aoss", "minio"];
const FILES = ["local", "sftp"];
const KINDS = {
  "file-object": [FILES, OBJECT],
  "object-file": [OBJECT, FILES],
  "object-object": [OBJECT, OBJECT],
  "cloud-object": [OBJECT.filter((t) => t !== "oss"), [...OBJECT, ...FILES]],
};
const jobs = new Map();
let detailJob = null;

async function api(action, params = {}) {
  const resp = await fetch("/api/" + action, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(params),
  });
  const body = await resp.json();
  if (!resp.ok) throw Object.assign(new Error(body.Message), { code: body.Code });
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function eta(s) {
  if (s === null || s === undefined) return "-";
  return s > 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min` : s > 60 ? `${Math.round(s / 60)} min` : `${s} s`;
}

// ---- views ----------------------------------------------------------------------------------
function show(view) {
  for (const v of ["jobs", "new", "detail", "flows"]) document.getElementById(v + "-view").hidden = v !== view;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.id === "show-" + view);
  if (view !== "detail") detailJob = null;
}
document.getElementById("show-jobs").onclick = () => show("jobs");
document.getElementById("show-new").onclick = () => show("new");
document.getElementById("show-flows").onclick = () => show("flows");
document.getElementById("back").onclick = () => show("jobs");

// ---- job cards ------------------------------------------------------------------------------
function card(job) {
  const pct = (job.Progress / 100).toFixed(1);
  const fill = el("div");
  fill.style.width = `${pct}%`;  // through the CSSOM: the page's CSP allows no inline style
  const bar = el("div", { class: "bar" }, fill);
  return el("article", { class: "card", "data-job": job.JobName },
    el("h2", {}, job.JobName, el("span", { class: "state " + job.State }, job.State)),
    el("p", { class: "places" }, `${job.Source} \u2192 ${job.Destination}`),
    bar,
    el("div", { class: "nums" },
      el("span", { class: "progress" }, `${pct} %`),
      el("span", {}, `files ${job.FilesDone}/${job.FilesTotal}`),
      el("span", {}, `${size(job.BytesDone)} / ${size(job.BytesTotal)}`),
      el("span", { class: "failed-count" }, `failed ${job.FilesFailed}`),
      el("span", {}, `${size(job.Throughput || 0)}/s`),
      el("span", {}, `ETA ${eta(job.Eta)}`)));
}

function renderJobs() {
  const box = document.getElementById("jobs");
  box.replaceChildren();
  if (!jobs.size) {
    box.append(el("p", { class: "empty" }, "No jobs yet: create one with New job."));
    return;
  }
  for (const job of [...jobs.values()].sort((a, b) => a.JobName.localeCompare(b.JobName))) {
    const c = card(job);
    c.onclick = () => openDetail(job.JobName);
    box.append(c);
  }
}

async function loadJobs() {
  let token = "";
  jobs.clear();
  do {
    const body = await api("DescribeJobs", { MaxResults: 100, NextToken: token });
    for (const j of body.Jobs.Job) jobs.set(j.JobName, j);
    token = body.NextToken;
  } while (token);
  renderJobs();
}

// ---- new job --------------------------------------------------------------------------------
function fillSide(side, types) {
  const box = document.getElementById(side);
  const keep = box.querySelector("legend");
  box.replaceChildren(keep, document.getElementById("side").content.cloneNode(true));
  for (const node of box.querySelectorAll("[data-key]")) node.name = side + node.dataset.key;
  const select = box.querySelector("select");
  for (const t of types) select.append(el("option", { value: t }, t));
  const update = () => {
    const local = select.value === "local";
    for (const r of box.querySelectorAll(".remote")) r.hidden = local;
    box.querySelector(".bucket").hidden = local || select.value === "sftp";
  };
  select.onchange = update;
  update();
}

const form = document.getElementById("new-job");
function setKind() {
  const [src, dest] = KINDS[form.kind.value];
  fillSide("src", src);
  fillSide("dest", dest);
}
form.kind.onchange = setKind;
setKind();

function clearErrors() {
  for (const e of form.querySelectorAll(".field-error, .error")) e.textContent = "";
  for (const e of form.querySelectorAll(".invalid")) e.classList.remove("invalid");
}

function showError(err) {
  // "CreateJob: srcPrefix='x' is not allowed; ..." names the field: put it beside that field
  const m = /^CreateJob: (src|dest)?([A-Za-z]+)/.exec(err.message);
  const exists = err.code === "Job.AlreadyExists";
  let target = null;
  if (exists) target = form.querySelector('[data-for="jobName"]');
  else if (m && m[1]) target = document.getElementById(m[1]).querySelector(`[data-for="${m[2]}"]`);
  else if (m) target = form.querySelector(`[data-for="${m[2]}"]`);
  (target || document.getElementById("form-error")).textContent = err.message;
  const input = target && target.previousElementSibling && target.previousElementSibling.querySelector("input, select");
  if (input) input.classList.add("invalid");
}

form.onsubmit = async (ev) => {
  ev.preventDefault();
  clearErrors();
  const params = {};
  for (const input of form.querySelectorAll("input, select")) {
    if (input.name && input.name !== "kind" && input.value && !input.closest("[hidden]")) params[input.name] = input.value;
  }
  try {
    const body = await api("CreateJob", params);
    form.reset();
    setKind();
    await loadJobs();
    show("jobs");
    return body;
  } catch (err) {
    showError(err);
  }
};

// ---- detail ---------------------------------------------------------------------------------
function chart(points) {
  const svg = document.getElementById("chart");
  svg.replaceChildren();
  if (points.length < 2) return;
  const max = Math.max(...points.map((p) => p.Throughput), 1);
  const xy = points.map((p, i) => `${(i / (points.length - 1)) * 600},${115 - (p.Throughput / max) * 110}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", xy.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2563eb");
  line.setAttribute("stroke-width", "2");
  svg.append(line);
}

async function openDetail(name) {
  const body = await api("DescribeJob", { JobName: name });
  const job = body.Job;
  detailJob = name;
  show("detail");
  detailJob = name;
  document.getElementById("detail-name").textContent = `${job.JobName} \u2014 ${job.State}`;
  document.getElementById("detail-places").textContent = `${job.Source} \u2192 ${job.Destination}`;
  const dl = document.getElementById("detail-counters");
  dl.replaceChildren();
  for (const [k, v] of [["Progress", `${(job.Progress / 100).toFixed(1)} %`], ["Files", `${job.FilesDone}/${job.FilesTotal}`],
    ["Bytes", `${size(job.BytesDone)} / ${size(job.BytesTotal)}`], ["Failed files", job.FilesFailed],
    ["Tasks pending", job.PendingTasks], ["Tasks running", job.DispatchedTasks], ["Tasks done", job.SucceedTasks],
    ["Tasks failed", job.FailedTasks], ["Throughput", `${size(job.Throughput || 0)}/s`], ["ETA", eta(job.Eta)]]) {
    dl.append(el("dt", {}, k), el("dd", {}, v));
  }
  chart(job.ThroughputHistory);
  const rows = document.querySelector("#failed tbody");
  rows.replaceChildren(...job.FailedFiles.FailedFile.map((f) => el("tr", {}, el("td", {}, f.Key), el("td", {}, f.Cause))));
  document.getElementById("retry").disabled = job.FailedFiles.FailedFile.length === 0;
}

document.getElementById("retry").onclick = async () => {
  if (!detailJob) return;
  await api("RetryJob", { JobName: detailJob });
  await openDetail(detailJob);
};

// ---- dataflows ------------------------------------------------------------------------------
let flowsFs = "";
let flowsTimer = null;
document.getElementById("flows-form").onsubmit = (ev) => {
  ev.preventDefault();
  flowsFs = ev.target.fs.value;
  return showFlows(flowsFs);
};

async function showFlows(fs) {
  const box = document.getElementById("flows");
  document.getElementById("flows-error").textContent = "";
  box.replaceChildren();
  try {
    const flows = (await api("DescribeDataFlows", { FileSystemId: fs, MaxResults: 100 })).DataFlowInfo.DataFlow;
    const tasks = (await api("DescribeDataFlowTasks", { FileSystemId: fs, MaxResults: 100 })).TaskInfo.Task;
    const subs = (await api("DescribeDataFlowSubTasks", { FileSystemId: fs, MaxResults: 100 })).DataFlowSubTask.DataFlowSubTask;
    for (const f of flows) {
      const list = el("ul");
      for (const t of tasks.filter((t) => t.DataFlowId === f.DataFlowId)) {
        const items = subs.filter((s) => s.DataFlowTaskId === t.TaskId)
          .map((s) => el("li", { class: "subtask", "data-subtask": s.DataFlowSubTaskId },
            `${s.SrcFilePath} \u2192 ${s.DstFilePath}: `, el("span", { class: "status" }, s.Status),
            ` ${(s.Progress / 100).toFixed(1)} % ${s.ErrorMsg}`));
        list.append(el("li", {}, `${t.TaskId} ${t.TaskAction} ${t.Directory} \u2192 ${t.DstDirectory}: ${t.Status}`, el("ul", {}, ...items)));
      }
      box.append(el("div", { class: "flow" }, el("b", {}, f.DataFlowId), ` ${f.SourceStorage}${f.SourceStoragePath} \u2194 ${f.FileSystemPath}: ${f.Status}`, list));
    }
    if (!flows.length) box.append(el("p", { class: "empty" }, "No dataflows on this file system."));
  } catch (err) {
    document.getElementById("flows-error").textContent = err.message;
  }
}

function flowsChanged() {
  // subtask events come per change: redraw the dataflows view at most once a second
  if (!flowsFs || document.getElementById("flows-view").hidden || flowsTimer) return;
  flowsTimer = setTimeout(() => { flowsTimer = null; showFlows(flowsFs); }, 1000);
}

// ---- live updates ---------------------------------------------------------------------------
function listen() {
  const source = new EventSource("/api/events");
  const dot = document.getElementById("live");
  source.onopen = () => dot.classList.add("on");
  source.onerror = () => dot.classList.remove("on");
  source.addEventListener("job", (ev) => {
    const job = JSON.parse(ev.data);
    if (job.State === "DELETED") jobs.delete(job.JobName);
    else if (job.Source !== undefined) jobs.set(job.JobName, job);
    else return loadJobs();
    renderJobs();
    if (detailJob === job.JobName) openDetail(job.JobName);
  });
  source.addEventListener("subtask", flowsChanged);
}

loadJobs().then(listen);
