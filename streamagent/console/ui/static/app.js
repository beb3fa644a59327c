// The run timeline page: plain JavaScript, no build step. It only reads the JSON endpoints of the
// server that served it, and refreshes while it is open (every `poll_s` from /api/config).
"use strict";

const $ = (sel) => document.querySelector(sel);
// `pages`: how many pages of the runs list are shown (the "older" button adds one, a new filter resets it).
const state = { view: "runs", runId: null, status: "", q: "", pollMs: 1000, pageSize: 50, pages: 1, shown: {}, open: new Set() };

// Builds an element; text always goes in as text, never as HTML (every value comes from the events).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

const fmtTime = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "–");
const fmtDate = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}
function fmtCost(usd) {
  if (!usd) return "–";
  if (usd < 0.0001) return "<$0.0001";
  return usd < 1 ? `$${usd.toFixed(4)}` : `$${usd.toFixed(2)}`;
}
function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 1000 ? `${ms} ms` : fmtSeconds(ms / 1000);
}
const fmtOffset = (ms) => (ms < 10000 ? `+${ms} ms` : `+${(ms / 1000).toFixed(ms < 100000 ? 2 : 1)} s`);
const json = (value) => JSON.stringify(value, null, 2);
const badge = (status) => el("span", { class: `badge ${status}` }, status);

// -- routing --------------------------------------------------------------------------------------
function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  if (hash === "dlq" || hash === "approvals") {
    state.view = hash;
  } else {
    state.view = "runs";
    const match = hash.match(/^runs\/(.+)$/);
    const runId = match ? decodeURIComponent(match[1]) : null;
    if (runId !== state.runId) {
      state.runId = runId;
      state.shown.run = null;
      state.open.clear();
    }
  }
  $("#runs-view").hidden = state.view !== "runs";
  $("#dlq-view").hidden = state.view !== "dlq";
  $("#approvals-view").hidden = state.view !== "approvals";
  for (const view of ["runs", "dlq", "approvals"]) $(`#nav-${view}`).classList.toggle("active", state.view === view);
  refreshNow();
}

// -- runs list ------------------------------------------------------------------------------------
function renderRuns(data) {
  const counts = $("#counts");
  counts.replaceChildren(
    ...Object.entries(data.counts).map(([status, n]) =>
      el(
        "button",
        {
          type: "button",
          class: state.status === status ? "active" : null,
          dataset: { status },
          onclick: () => setStatus(state.status === status ? "" : status),
        },
        `${status} ${n}`,
      ),
    ),
  );
  const rows = data.runs.map((run) =>
    el(
      "tr",
      {
        class: run.run_id === state.runId ? "selected" : null,
        dataset: { runId: run.run_id, status: run.status },
        onclick: () => (location.hash = `#/runs/${encodeURIComponent(run.run_id)}`),
      },
      el("td", { class: "status" }, badge(run.status)),
      el(
        "td",
        {},
        run.company_name || "?",
        run.workflow && run.workflow !== "onboarding" ? ` · ${run.workflow}` : "",
        // A child run (a parent's step started it): marked, with its parent in the tooltip.
        run.parent_run_id ? el("span", { class: "child", title: `child of ${run.parent_run_id} (step ${run.parent_step})` }, " ↳ child") : null,
      ),
      el("td", {}, `${run.steps_done}/${run.steps_total ?? "?"}`),
      el("td", { title: fmtDate(run.created_at) }, fmtTime(run.created_at)),
      el("td", {}, fmtSeconds(run.duration_s)),
      el("td", {}, fmtCost(run.cost_usd)),
      el("td", { class: "mono", title: run.run_id }, run.run_id.slice(0, 8)),
    ),
  );
  $("#runs tbody").replaceChildren(...rows);
  $("#runs-empty").hidden = rows.length > 0;
  $("#older").hidden = !data.next_before;
  $("#runs-shown").textContent = rows.length ? `${rows.length} newest${data.next_before ? "" : " (all)"}` : "";
}

// A new filter starts again from the newest page.
function setFilter(change) {
  Object.assign(state, change, { pages: 1 });
  state.shown.runs = null;
  refreshNow();
}

function setStatus(status) {
  $("#status").value = status;
  setFilter({ status });
}

// The list as `git log` shows it: the newest page, then each older page by its cursor (the last run of
// the page before), as many pages as the "older" button asked for; all of them stay live.
async function fetchRuns() {
  const params = new URLSearchParams({ limit: String(state.pageSize) });
  if (state.status) params.set("status", state.status);
  if (state.q) params.set("q", state.q);
  const first = await getJSON(`/api/runs?${params}`);
  const runs = [...first.runs];
  let next = first.next_before;
  for (let page = 1; page < state.pages && next; page++) {
    params.set("before", next);
    const older = await getJSON(`/api/runs?${params}`);
    runs.push(...older.runs);
    next = older.next_before;
  }
  return { ...first, runs, next_before: next };
}

// -- one run's timeline ---------------------------------------------------------------------------
function decisionDetails(d) {
  const parts = [];
  const tokens = d.prompt_tokens || d.completion_tokens
    ? `${d.tokens_estimated ? "~" : ""}${d.prompt_tokens}+${d.completion_tokens} tokens, ${fmtCost(d.cost_usd)}`
    : "no model tokens";
  parts.push(el("div", { class: "meta" }, el("span", {}, `decider: ${d.decider}`), el("span", {}, tokens)));
  if (d.guard) {
    const policy = d.guard.policy_version ? ` (policy ${d.guard.policy_version})` : "";
    parts.push(el("div", { class: `guard ${d.guard.outcome}` }, `guard: ${d.guard.outcome}`, d.guard.reason ? ` — ${d.guard.reason}` : "", policy));
  }
  for (const m of d.messages) {
    parts.push(el("div", { class: "msg-role" }, m.role + (m.name ? ` (${m.name})` : "")));
    parts.push(el("pre", {}, m.content + (m.tool_calls ? `\ntool_calls: ${m.tool_calls}` : "")));
  }
  d.answers.forEach((answer, i) => {
    parts.push(el("div", { class: "msg-role" }, d.answers.length > 1 ? `answer ${i + 1}/${d.answers.length}` : "answer"));
    parts.push(el("pre", {}, answer));
  });
  for (const [key, value] of Object.entries(d.other || {})) {
    parts.push(el("div", { class: "msg-role" }, key));
    parts.push(el("pre", {}, typeof value === "string" ? value : json(value)));
  }
  return parts;
}

function entryDetails(e) {
  const p = e.payload || {};
  if (e.type === "DecisionRecorded" && e.decision) {
    return [
      ...decisionDetails(e.decision),
      Object.keys(p.arguments || {}).length ? [el("div", { class: "msg-role" }, "arguments"), el("pre", {}, json(p.arguments))] : [],
    ];
  }
  if (e.type === "ToolResult") {
    const body = p.status === "succeeded" ? json(p.output) : `${p.error_kind || "error"}: ${p.error || ""}`;
    return [
      // A model-backed tool (draft): what it asked the model and what the model answered.
      ...(e.model ? decisionDetails(e.model) : []),
      el(
        "div",
        { class: "meta" },
        el("span", {}, `attempts: ${p.attempts}`),
        // Timed by the tool process that answered: after a restart or an outage, only its own execution.
        el("span", {}, `latency of the last execution: ${p.duration_ms} ms`),
        el("span", {}, `command ${p.command_id}`),
      ),
      el("pre", {}, body),
    ];
  }
  if (e.type === "ToolCommand") {
    return [el("div", { class: "meta" }, el("span", {}, `${p.tool}.${p.operation}`), el("span", {}, `command ${p.command_id}`)), el("pre", {}, json(p.arguments))];
  }
  return [el("pre", {}, json(p))]; // any other event type, including ones added later: its payload as is
}

function renderRun(data) {
  const run = data.run;
  const detail = $("#run-detail");
  detail.dataset.runId = run.run_id;
  detail.dataset.status = run.status;
  const note = (e) => {
    const d = e.decision || e.model;
    if (!d) return null;
    return [
      d.guard && d.guard.outcome !== "allowed" ? el("span", { class: `guard-badge ${d.guard.outcome}` }, `guard: ${d.guard.outcome}`) : null,
      d.prompt_tokens || d.cost_usd ? el("span", { class: "cost" }, `${d.prompt_tokens}+${d.completion_tokens} tokens ${fmtCost(d.cost_usd)}`) : null,
    ];
  };
  const entries = data.timeline.map((e) => {
    const open = state.open.has(e.event_id);
    const details = el("details", { open, ontoggle: (ev) => (ev.target.open ? state.open.add(e.event_id) : state.open.delete(e.event_id)) },
      el("summary", {}, "details"), ...entryDetails(e));
    return el(
      "li",
      { class: `entry ${e.payload && e.payload.status ? e.payload.status : ""}`, dataset: { type: e.type, step: e.step || "" } },
      el("span", { class: "at", title: fmtDate(e.occurred_at) }, fmtOffset(e.offset_ms)),
      el("span", { class: "type" }, e.type),
      e.step ? el("span", { class: "step" }, e.step) : null,
      note(e),
      el("span", { class: "summary" }, e.summary),
      details,
    );
  });
  const model = run.model_decisions
    ? `${run.model_decisions} model decision(s), ${run.prompt_tokens}+${run.completion_tokens} tokens${run.estimated_decisions ? " (estimated)" : ""}, ${fmtCost(run.cost_usd)}`
    : "decided by the rules (no model cost)";
  // Through el(), which drops the parts a run does not have (a reason, before it ends).
  detail.replaceChildren(...el("div", {},
    el("h2", {}, run.company_name || "?", " ", badge(run.status)),
    el(
      "div",
      { class: "meta" },
      el("span", { class: "mono" }, run.run_id),
      el("span", {}, `workflow ${run.workflow || "?"}`),
      el("span", {}, `started ${fmtDate(run.created_at)}`),
      el("span", {}, run.ended_at ? `took ${fmtSeconds(run.duration_s)}` : "in flight"),
      el("span", {}, model),
    ),
    run.reason ? el("div", { class: `reason ${run.status}` }, run.failed_step ? `${run.failed_step}: ` : "", run.reason) : null,
    // Child workflows: the parent of a child run, and a parent's children, each a link to its page.
    run.parent_run_id
      ? el("div", { id: "parent", class: "family" }, "child of ", el("a", { href: `#/runs/${encodeURIComponent(run.parent_run_id)}` }, run.parent_run_id), ` (step ${run.parent_step})`)
      : null,
    (data.children || []).length
      ? el("ul", { id: "children", class: "family" }, data.children.map((c) =>
          el("li", { dataset: { runId: c.run_id, status: c.status } }, `step ${c.parent_step}: `, el("a", { href: `#/runs/${encodeURIComponent(c.run_id)}` }, c.run_id), ` · ${c.workflow || "?"} `, badge(c.status))))
      : null,
    el(
      "ul",
      { id: "steps" },
      data.steps.map((s) =>
        el(
          "li",
          { class: s.status, dataset: { step: s.name, status: s.status } },
          el("b", {}, s.name),
          s.status,
          // The step's own figures: the tool's count of attempts, and first command to final result.
          s.attempts ? ` · ${s.attempts} attempt${s.attempts === 1 ? "" : "s"}` : "",
          s.duration_ms !== null && s.duration_ms !== undefined
            ? el("span", { class: "took", title: s.last_call_ms !== null ? `the tool's last execution: ${s.last_call_ms} ms` : null }, ` · ${fmtMs(s.duration_ms)}`)
            : "",
          s.sent > 1 ? el("div", { class: "sent" }, `command sent ${s.sent}×`) : null,
          s.undo ? el("div", { class: "undo" }, s.undo) : null,
        ),
      ),
    ),
    el("ol", { id: "timeline" }, entries),
  ).childNodes);
}

function renderNoRun(message) {
  const detail = $("#run-detail");
  delete detail.dataset.runId;
  detail.replaceChildren(el("p", { class: "empty" }, message));
}

// -- approvals ------------------------------------------------------------------------------------
function renderApprovalsCount(data) {
  const count = $("#approvals-count");
  count.textContent = String(data.waiting_runs);
  count.dataset.count = String(data.waiting_runs);
  count.title = `${data.waiting_runs} run(s) waiting for approval`;
}

// A command to paste into a terminal: selected whole on a click, and copied by its button.
function commandLine(text, kind) {
  const code = el("code", { class: `command ${kind}`, title: "click to select" }, text);
  code.addEventListener("click", () => window.getSelection().selectAllChildren(code));
  const copy = el("button", { type: "button", class: "copy", title: "copy to the clipboard" }, "copy");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      copy.textContent = "copied";
    } catch {
      window.getSelection().selectAllChildren(code); // no clipboard (not a secure origin): selected instead
      copy.textContent = "selected: press Ctrl+C";
    }
  });
  return el("div", { class: "answer" }, code, copy);
}

function renderApprovals(data) {
  const rows = data.approvals.map((a) =>
    el(
      "tr",
      { dataset: { runId: a.run_id, step: a.step } },
      el("td", { class: "mono", title: a.run_id }, el("a", { href: `#/runs/${encodeURIComponent(a.run_id)}` }, a.run_short)),
      el("td", {}, a.workflow || "?", a.company_name ? el("div", { class: "empty" }, a.company_name) : null),
      el("td", {}, a.step),
      el("td", {}, a.tool),
      el("td", { class: "what", title: json(a.arguments) }, a.what),
      el("td", { class: "rule" }, a.reason, el("div", { class: "empty" }, `policy ${a.policy_version}`)),
      el("td", { title: fmtDate(a.requested_at) }, `${a.age} ago`),
      el("td", { class: "expires", title: fmtDate(a.expires_at) }, a.expires_in ? `in ${a.expires_in}` : "overdue (expiring)"),
      el("td", {}, commandLine(a.approve, "approve"), commandLine(a.deny, "deny")),
    ),
  );
  $("#approvals tbody").replaceChildren(...rows);
  $("#approvals-empty").hidden = rows.length > 0;
}

// -- dead letters ---------------------------------------------------------------------------------
function renderDlq(data) {
  const rows = data.dead_letters.map((d) =>
    el(
      "tr",
      { dataset: { reason: d.reason } },
      el("td", { title: new Date(d.at_ms).toISOString() }, new Date(d.at_ms).toLocaleString()),
      el("td", {}, d.processor),
      el("td", {}, badge(d.reason)),
      el("td", { class: "mono" }, `${d.source_topic}[${d.source_partition}]@${d.source_offset}`),
      el("td", { class: "mono" }, d.key ? el("a", { href: `#/runs/${encodeURIComponent(d.key)}` }, d.key) : "–"),
      el("td", { title: d.error }, d.error.length > 160 ? d.error.slice(0, 159) + "…" : d.error),
    ),
  );
  $("#dlq tbody").replaceChildren(...rows);
  $("#dlq-empty").hidden = rows.length > 0;
}

// -- refresh loop ---------------------------------------------------------------------------------
// Each view is redrawn only when its data changed, so an opened "details" or a scrolled list stays put.
function changed(key, data) {
  const { at, read_s_ago, ...rest } = data;
  const text = JSON.stringify(rest);
  if (state.shown[key] === text) return false;
  state.shown[key] = text;
  return true;
}

async function refresh() {
  // The header's count of runs waiting for approval, on every view.
  const approvals = await getJSON("/api/approvals");
  renderApprovalsCount(approvals);
  if (state.view === "approvals") {
    // Ages and expiries change by the minute, so the view is redrawn when they do, not on every refresh.
    if (changed("approvals", approvals)) renderApprovals(approvals);
    return approvals.approvals.length > 0;
  }
  if (state.view === "dlq") {
    const data = await getJSON("/api/dlq");
    if (changed("dlq", data)) renderDlq(data);
    return false;
  }
  const runs = await fetchRuns();
  if (changed("runs", { ...runs, selected: state.runId })) renderRuns(runs);
  let busy = runs.runs.some((r) => r.status === "running");
  if (state.runId) {
    try {
      const run = await getJSON(`/api/runs/${encodeURIComponent(state.runId)}`);
      if (changed("run", run)) renderRun(run);
      busy = busy || run.run.status === "running";
    } catch (error) {
      state.shown.run = null;
      renderNoRun(`${error.message} (yet: a run just submitted appears when its first event is projected)`);
      busy = true;
    }
  } else if (state.shown.run !== "none") {
    state.shown.run = "none";
    renderNoRun("choose a run to see its timeline");
  }
  return busy;
}

let timer = null;
let inFlight = false;
async function tick() {
  clearTimeout(timer);
  if (!inFlight && !document.hidden) {
    inFlight = true;
    const live = $("#live");
    try {
      const busy = await refresh();
      $("#banner").hidden = true;
      live.className = `live on${busy ? " busy" : ""}`;
      live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      $("#banner").textContent = `cannot refresh: ${error.message}`;
      $("#banner").hidden = false;
      live.className = "live";
      live.textContent = "not updating";
    } finally {
      inFlight = false;
    }
  }
  timer = setTimeout(tick, state.pollMs);
}
const refreshNow = () => tick();

async function start() {
  try {
    const config = await getJSON("/api/config");
    state.pollMs = Math.max(200, config.poll_s * 1000);
    state.pageSize = config.page_size || state.pageSize;
  } catch {
    /* the defaults */
  }
  // `?page_size=N` in the page's address: another page size for this tab.
  const asked = Number(new URLSearchParams(location.search).get("page_size"));
  if (Number.isInteger(asked) && asked >= 1 && asked <= 1000) state.pageSize = asked;
  $("#older").addEventListener("click", () => {
    state.pages += 1;
    refreshNow();
  });
  $("#status").addEventListener("change", (ev) => setStatus(ev.target.value));
  let typing = null;
  $("#search").addEventListener("input", (ev) => {
    clearTimeout(typing);
    typing = setTimeout(() => setFilter({ q: ev.target.value.trim() }), 250);
  });
  document.addEventListener("visibilitychange", () => !document.hidden && refreshNow());
  window.addEventListener("hashchange", route);
  route();
}
start();
