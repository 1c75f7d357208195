// The registry's dashboard: plain modern JavaScript, no library, no build step.
// The session lives in an HttpOnly cookie the page never sees; nothing is stored in the
// browser. Everything on screen is built with textContent, never innerHTML, so a workspace
// name or an error message cannot inject markup.

const STATUSES = ["provisioning", "online", "degraded", "offline", "failed", "paused"];
const SYNCS = ["synced", "out_of_sync", "reconciling", "failed"];
const EVENT_KINDS = ["status", "reconcile", "runtime", "token", "fleet", "audit"];
// Live updates re-render at most this often, so a burst of flips cannot freeze the page.
const RENDER_EVERY_MS = 500;
const PAGE_SIZE = 50;
// The chart's history is read again this often; between reads its last point is the live count.
const HISTORY_EVERY_MS = 60_000;
const SVG = "http://www.w3.org/2000/svg";
const STREAM_RETRY_MS = 3000;

const main = document.getElementById("main");
let session = null; // {name, role}
let stream = null;
let view = null; // the current view's {refresh} so live events know what to redraw
// Counters for whoever looks (tests, an operator's console): events taken in, live re-renders,
// when the first and last event came, whether a re-render is still due, streams opened.
const stats = { events: 0, renders: 0, firstAt: null, lastAt: null, due: false, opened: 0 };
window.registryDashboard = stats;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401 && path !== "/ui/login") {
    showLogin("Your session has ended; log in again.");
    throw new Error("unauthorized");
  }
  const text = await response.text();
  const data = text && response.headers.get("Content-Type")?.includes("json") ? JSON.parse(text) : null;
  if (!response.ok) {
    const message = data?.error?.message ?? `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return data;
}

function canOperate() {
  return session && (session.role === "operate" || session.role === "admin");
}

// --- login ---------------------------------------------------------------------------------

function showLogin(message) {
  session = null;
  view?.stop?.();
  view = null;
  closeStream();
  document.getElementById("who").textContent = "";
  document.getElementById("logout").hidden = true;
  const error = el("p", { class: "error", "data-testid": "login-error", text: message ?? "" });
  const token = el("input", {
    type: "password", name: "token", autocomplete: "off", required: true,
    placeholder: "rat_… or the admin token", "aria-label": "API token",
  });
  const form = el("form", { class: "card login", "data-testid": "login-form" },
    el("h1", { text: "Log in" }),
    el("p", { class: "muted", text: "Paste a read, operate or admin API token. It is sent once and never stored in this browser." }),
    token, el("button", { type: "submit", text: "Log in" }), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      session = await api("POST", "/ui/login", { token: token.value });
      token.value = "";
      start();
    } catch (e) {
      error.textContent = e.message;
    }
  });
  main.replaceChildren(form);
  token.focus();
}

async function logout() {
  try { await api("POST", "/ui/logout"); } catch { /* ended either way */ }
  location.hash = "#/";
  showLogin("Logged out.");
}

// --- live events ---------------------------------------------------------------------------

function closeStream() {
  if (stream) stream.close();
  stream = null;
}

function openStream() {
  closeStream();
  // Same origin: the session cookie goes along; no token in the URL.
  stream = new EventSource("/events");
  const onEvent = (message) => {
    stats.events += 1;
    stats.lastAt = performance.now();
    stats.firstAt ??= stats.lastAt;
    if (view && view.wants(message)) view.changed();
  };
  for (const kind of EVENT_KINDS) stream.addEventListener(kind, onEvent);
  stream.addEventListener("dropped", () => { openStream(); view?.changed(); });
  // A refused stream (the session ended, a 503) is not retried by the browser: ask who we
  // are (a 401 brings the login form back), then open it again.
  const opened = stream;
  stream.addEventListener("open", () => { stats.opened += 1; });
  stream.addEventListener("error", () => {
    if (opened.readyState === EventSource.CLOSED) reviveStream(opened);
  });
}

function reviveStream(closed) {
  setTimeout(async () => {
    if (stream !== closed || !session) return; // replaced meanwhile, or logged out
    try {
      await api("GET", "/ui/session");
    } catch (e) {
      if (e.message !== "unauthorized") reviveStream(closed); // unreachable: try again later
      return;
    }
    openStream();
    view?.changed();
  }, STREAM_RETRY_MS);
}

// Calls fn at most once per RENDER_EVERY_MS, however often it is asked, and never twice at once.
function throttled(fn) {
  let timer = null;
  let running = false;
  let again = false;
  const run = async () => {
    timer = null;
    if (running) { again = true; return; }
    running = true;
    stats.renders += 1;
    try { await fn(); } catch { /* shown by the next successful render */ }
    running = false;
    if (again) { again = false; schedule(); } else { stats.due = false; }
  };
  const schedule = () => {
    stats.due = true;
    if (timer === null) timer = setTimeout(run, RENDER_EVERY_MS);
  };
  return schedule;
}

// --- fleet view ----------------------------------------------------------------------------

function fleetView(params) {
  const filters = {
    status: params.get("status") ?? "",
    plugins_sync: params.get("plugins_sync") ?? "",
    selector: params.get("selector") ?? "",
    name_prefix: params.get("name_prefix") ?? "",
  };
  const cursors = [null]; // the cursor of each page seen, for "previous"
  let page = 0;

  const counts = el("div", { class: "counts", "data-testid": "counts" });
  const syncCounts = el("div", { class: "counts", "data-testid": "sync-counts" });
  const chart = el("figure", { class: "chart", "data-testid": "chart" });
  let history = null; // {points: [{at, statuses}]} from /fleet/history; its last point is now
  let liveStatuses = null; // the counts of the last /fleet read
  const guard = el("p", { "data-testid": "guard" });
  const rows = el("tbody", { "data-testid": "rows" });
  const info = el("span", { class: "muted", "data-testid": "page-info" });
  const prev = el("button", { type: "button", text: "← Previous", "data-testid": "prev" });
  const next = el("button", { type: "button", text: "Next →", "data-testid": "next" });

  const input = (name, label, placeholder) => el("label", {}, label,
    el("input", { name, value: filters[name], placeholder, "data-testid": `filter-${name}` }));
  const select = (name, label, options) => el("label", {}, label,
    el("select", { name, "data-testid": `filter-${name}` },
      el("option", { value: "", text: "any" }),
      ...options.map((o) => el("option", { value: o, text: o, selected: filters[name] === o }))));
  const form = el("form", { class: "filters card", "data-testid": "filters" },
    select("status", "status", STATUSES), select("plugins_sync", "plugins sync", SYNCS),
    input("selector", "labels", "team=a,env!=prod"), input("name_prefix", "name starts with", ""),
    el("button", { type: "submit", text: "Filter" }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const query = new URLSearchParams();
    for (const [key, value] of data) if (value) query.set(key, value);
    location.hash = `#/?${query}`;
  });

  async function renderCounts() {
    const fleet = await api("GET", "/fleet");
    const total = Object.values(fleet.statuses).reduce((a, b) => a + b, 0);
    const tile = (name, value, n, testid, cls) => el("button", {
      type: "button", class: `count${filters[name] === value ? " active" : ""}`,
      "data-testid": testid, "aria-pressed": String(filters[name] === value),
      onclick: () => setFilter(name, filters[name] === value ? "" : value),
    }, el("span", { class: cls, text: (value || "all").replaceAll("_", " ") }), el("b", { text: String(n) }));
    counts.replaceChildren(tile("status", "", total, "count-all", ""),
      ...STATUSES.map((s) => tile("status", s, fleet.statuses[s] ?? 0, `count-${s}`, `status status-${s}`)));
    syncCounts.replaceChildren(
      ...SYNCS.map((s) => tile("plugins_sync", s, fleet.plugins_sync[s] ?? 0, `sync-${s}`, `status sync-${s}`)));
    liveStatuses = fleet.statuses;
    drawChart();
    const g = fleet.mass_expiry_guard;
    guard.className = g.holding ? "guard-holding" : "muted";
    guard.textContent = g.holding
      ? `Mass-expiry guard HOLDING since ${g.since}: ${g.silent} silent of ${g.live + g.silent} live`
        + (g.acknowledged ? ` (acknowledged by ${g.acknowledged_by})` : "")
      : "Mass-expiry guard: not holding";
  }

  async function loadHistory() {
    history = await api("GET", "/fleet/history");
    drawChart();
  }

  // A line per status over the last hour, one point a minute; the newest is the live count.
  function drawChart() {
    if (!history) return;
    const points = history.points.map((p) => p.statuses);
    if (liveStatuses) points[points.length - 1] = Object.fromEntries(STATUSES.map((s) => [s, liveStatuses[s] ?? 0]));
    const W = 600, H = 120, PAD = 4;
    const top = Math.max(1, ...points.flatMap((p) => STATUSES.map((s) => p[s] ?? 0)));
    const x = (i) => PAD + (i * (W - 2 * PAD)) / Math.max(1, points.length - 1);
    const y = (n) => H - PAD - (n * (H - 2 * PAD)) / top;
    const lines = STATUSES.map((s) => {
      const values = points.map((p) => p[s] ?? 0);
      return svg("polyline", {
        class: `line line-${s}`, "data-testid": `chart-${s}`, "data-values": values.join(","),
        points: values.map((n, i) => `${x(i).toFixed(1)},${y(n).toFixed(1)}`).join(" "),
      }, svg("title", { text: `${s}: ${values[values.length - 1]} now` }));
    });
    chart.replaceChildren(
      svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
        "aria-label": "workspaces per status over the last hour" },
      svg("line", { class: "axis", x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD }), ...lines),
      el("figcaption", { class: "muted" }, `last hour, per minute · peak ${top} · `,
        ...STATUSES.flatMap((s) => [el("span", { class: `key key-${s}`, text: s }), " "])));
  }

  async function renderRows() {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const [key, value] of Object.entries(filters)) if (value) query.set(key, value);
    if (cursors[page]) query.set("cursor", cursors[page]);
    const list = await api("GET", `/workspaces?${query}`);
    cursors[page + 1] = list.next_cursor;
    rows.replaceChildren(...list.workspaces.map((w) => el("tr", { "data-testid": "row", "data-id": w.id },
      el("td", {}, el("a", { href: `#/w/${w.id}`, text: w.name })),
      el("td", { class: `status status-${w.status}`, "data-testid": "row-status", text: w.status }),
      el("td", { class: `sync-${w.plugins_sync}`, text: w.plugins_sync }),
      el("td", { class: "labels" }, Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(" ")),
      el("td", { class: "why", text: w.why ?? "" }))));
    if (!list.workspaces.length) {
      rows.replaceChildren(el("tr", {}, el("td", { colspan: "5", class: "muted", text: "No workspace matches." })));
    }
    info.textContent = `page ${page + 1}`;
    prev.disabled = page === 0;
    next.disabled = !list.next_cursor;
  }

  function setFilter(name, value) {
    const query = new URLSearchParams();
    for (const [key, v] of Object.entries({ ...filters, [name]: value })) if (v) query.set(key, v);
    location.hash = `#/?${query}`;
  }

  prev.addEventListener("click", () => { page = Math.max(0, page - 1); renderRows(); });
  next.addEventListener("click", () => { if (cursors[page + 1]) { page += 1; renderRows(); } });

  main.replaceChildren(
    el("section", { class: "card" }, el("h1", { text: "Fleet" }), counts,
      el("h2", { text: "Plugins sync" }), syncCounts, chart, guard),
    form,
    el("div", { class: "table-wrap" }, el("table", { "data-testid": "workspaces" },
      el("thead", {}, el("tr", {}, el("th", { text: "name" }), el("th", { text: "status" }),
        el("th", { text: "plugins" }), el("th", { class: "labels", text: "labels" }),
        el("th", { class: "why", text: "why" }))), rows)),
    el("div", { class: "pager" }, prev, next, info));
  let historyTimer = null;
  const refresh = async () => {
    await Promise.all([renderCounts(), renderRows()]);
    // The chart once the table is up: its read is the slowest of the page's.
    if (historyTimer === null) {
      historyTimer = setInterval(() => loadHistory().catch(() => {}), HISTORY_EVERY_MS);
      loadHistory().catch(() => {});
    }
  };
  // Any event may change a count or a row of the page.
  return { refresh, changed: throttled(refresh), wants: () => true, stop: () => { clearInterval(historyTimer); historyTimer = -1; } };
}

// --- workspace view ------------------------------------------------------------------------

function shortSha(sha) {
  return sha ? sha.slice(0, 12) : "—";
}

function workspaceView(id) {
  const body = el("div", { "data-testid": "workspace" }, el("p", { class: "muted", text: "Loading…" }));
  const message = el("p", { "data-testid": "action-message", "aria-live": "polite" });
  main.replaceChildren(el("p", {}, el("a", { href: "#/", text: "← Fleet" })), message, body);

  let tracked = null; // the reconcile run started from this page, followed until it ends

  async function act(label, method, path, payload) {
    message.className = "";
    message.textContent = `${label}…`;
    try {
      const answer = await api(method, path, payload);
      if (answer?.reconcile) {
        tracked = answer.reconcile.id;
        showProgress(answer.reconcile);
      } else {
        message.textContent = `${label}: done`;
      }
    } catch (e) {
      message.className = "error";
      message.textContent = `${label}: ${e.message}`;
    }
    await refresh().catch(() => {});
  }

  // Reconcile progress, from the run's own record: re-read as its events arrive.
  function showProgress(run) {
    // Steps are recorded as each one finishes.
    const steps = run.steps.length ? ` · ${run.steps.length} step${run.steps.length > 1 ? "s" : ""} done` : "";
    const ended = run.status === "succeeded" || run.status === "failed";
    message.className = run.status === "failed" ? "error" : "";
    message.textContent = `Reconcile ${run.status}${steps}${run.status === "failed" && run.error ? `: ${run.error}` : ""}`;
    if (ended) tracked = null;
  }

  function actions(w) {
    if (!canOperate() || w.status === "removed") return null;
    return el("div", { class: "actions card", "data-testid": "actions" },
      el("button", { type: "button", text: "Reconcile now", "data-testid": "reconcile",
        onclick: () => act("Reconcile", "POST", `/internal/workspaces/${id}/reconcile`, {}) }),
      w.status === "paused"
        ? el("button", { type: "button", text: "Resume", "data-testid": "resume",
          onclick: () => act("Resume", "POST", `/workspaces/${id}/resume`) })
        : el("button", { type: "button", text: "Pause", "data-testid": "pause",
          onclick: () => act("Pause", "POST", `/workspaces/${id}/pause`) }),
      el("button", { type: "button", class: "danger", text: "Delete", "data-testid": "delete",
        onclick: () => {
          if (confirm(`Delete workspace "${w.name}"? This cannot be undone.`)) {
            act("Delete", "DELETE", `/workspaces/${id}`);
          }
        } }));
  }

  function plugins(w) {
    const declaredList = w.declared_plugins ?? [];
    const installed = new Map((w.installed_plugins ?? []).map((p) => [p.name, p]));
    const observed = new Map((w.observed_plugins ?? []).map((p) => [p.name, p]));
    const names = [...new Set([...declaredList.map((p) => p.name), ...installed.keys(), ...observed.keys()])];
    return el("table", { "data-testid": "plugins" },
      el("thead", {}, el("tr", {}, ...["plugin", "declared source", "installed sha", "observed sha"].map((t) => el("th", { text: t })))),
      el("tbody", {}, ...names.map((name) => {
        const declared = declaredList.find((p) => p.name === name);
        const i = installed.get(name);
        const o = observed.get(name);
        const drift = !declared || !i || (o && o.sha !== i.sha);
        return el("tr", { class: drift ? "drift" : "" }, el("td", { text: name }),
          el("td", {}, el("code", { text: declared?.source ?? "(not declared)" })),
          el("td", {}, el("code", { text: shortSha(i?.sha) })),
          el("td", {}, el("code", { text: shortSha(o?.sha) })));
      })));
  }

  function reconciles(list) {
    if (!list.length) return el("p", { class: "muted", text: "No reconcile yet." });
    return el("ol", { "data-testid": "reconciles" }, ...list.map((r) => el("li", { "data-testid": "reconcile-run" },
      el("b", { text: `${r.status}` }), ` · ${r.trigger} · attempt ${r.attempt} · ${r.created_at}`,
      r.error ? el("div", { class: "error", text: r.error }) : null,
      r.next_attempt_at && r.status !== "succeeded" ? el("div", { class: "muted", text: `next retry ${r.next_attempt_at}` }) : null,
      el("ul", {}, ...r.steps.map((s) => el("li", { class: `step-${s.status}`, "data-testid": "reconcile-step" },
        `${s.action} ${s.plugin}: ${s.status}`, s.sha ? el("code", { text: ` ${shortSha(s.sha)}` }) : null,
        s.error ? el("div", { class: "error", text: s.error }) : null))))));
  }

  async function refresh() {
    const [w, runs, events, run] = await Promise.all([
      api("GET", `/workspaces/${id}`),
      api("GET", `/internal/workspaces/${id}/reconciles?limit=10`),
      api("GET", `/workspaces/${id}/events?limit=100`),
      tracked ? api("GET", `/internal/reconciles/${tracked}`) : null,
    ]);
    if (run) showProgress(run);
    body.replaceChildren(
      el("section", { class: "card" },
        el("h1", { "data-testid": "workspace-name", text: w.name }),
        el("p", {}, "status ", el("span", { class: `status status-${w.status}`, "data-testid": "workspace-status", text: w.status }),
          " · plugins ", el("span", { class: `sync-${w.plugins_sync}`, text: w.plugins_sync })),
        el("p", { "data-testid": "why", text: w.why ?? "Online and in sync." }),
        el("p", { class: "muted", text: `last heartbeat: ${w.heartbeat?.last_heartbeat_at ?? "never"}` }),
        w.last_refusal
          ? el("p", { class: "error", "data-testid": "refusal", text: `runtime refused ${w.last_refusal.count}× since ${w.last_refusal.since}: ${w.last_refusal.status} ${w.last_refusal.code}${w.last_refusal.field ? ` (${w.last_refusal.field})` : ""}, last at ${w.last_refusal.at}` })
          : null),
      actions(w),
      el("section", { class: "card table-wrap" }, el("h2", { text: "Plugins" }), plugins(w)),
      el("section", { class: "card" }, el("h2", { text: "Pending actions" }),
        w.pending_actions?.length
          ? el("ul", { "data-testid": "pending" }, ...w.pending_actions.map((a) => el("li", { text: `${a.type} (${a.reason}), ${Math.round(a.age_s)} s old${a.delivered_at ? ", delivered" : ""}` })))
          : el("p", { class: "muted", text: "None." })),
      el("section", { class: "card" }, el("h2", { text: "Reconciles" }), reconciles(runs.reconciles)),
      el("section", { class: "card" }, el("h2", { text: "Events" }),
        el("ul", { "data-testid": "events" }, ...events.events.slice().reverse().map((e) => el("li", {},
          `${e.at} ${e.kind} ${e.from ?? ""}${e.to ? ` → ${e.to}` : ""} ${e.cause ?? ""} ${e.actor ? `by ${e.actor}` : ""}`))))
    );
  }
  // Only this workspace's events (and fleet-wide ones) change what this page shows.
  const wants = (message) => {
    try {
      const event = JSON.parse(message.data);
      return event.workspace_id === id || event.workspace_id === null;
    } catch {
      return true;
    }
  };
  return { refresh, changed: throttled(refresh), wants };
}

// --- routing -------------------------------------------------------------------------------

function route() {
  if (!session) return;
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?");
  const match = path.match(/^\/w\/([0-9a-f-]{36})$/);
  view?.stop?.();
  view = match ? workspaceView(match[1]) : fleetView(new URLSearchParams(query));
  view.refresh().catch((e) => {
    if (e.message !== "unauthorized") main.append(el("p", { class: "error", text: e.message }));
  });
}

function start() {
  document.getElementById("who").textContent = `${session.name} (${session.role})`;
  document.getElementById("logout").hidden = false;
  openStream();
  route();
}

document.getElementById("logout").addEventListener("click", logout);
window.addEventListener("hashchange", route);
fetch("/ui/session", { credentials: "same-origin" }).then(async (response) => {
  if (response.ok) {
    session = await response.json();
    start();
  } else {
    showLogin();
  }
}, () => showLogin("The registry cannot be reached."));
