// The outrun dashboard: one page over the /v1 JSON API, no framework and no
// build step. Every value from the server is put in the DOM as text (never
// as HTML), so an event's payload or error cannot inject markup.
"use strict";

const POLL_MS = 3000;
const TOKEN_KEY = "outrun.admin.token";

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "unreachable", "the outrun server does not answer (" + e.message + ")");
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!res.ok) {
    const err = (data && data.error) || {};
    const e = new ApiError(res.status, err.code || "error", err.message || res.statusText);
    e.method = method;
    throw e;
  }
  return data;
}

// What an API error means to the person who clicked, for the flash line.
function explain(err, what) {
  if (err.status === 401 && err.method === "GET") {
    return "this server wants the admin token for reading too ([admin] token_for_reads): enter it above (" + err.message + ")";
  }
  if (err.status === 401) {
    return "this action needs the admin token: enter it above (" + err.message + ")";
  }
  if (err.status === 404 && what && what.eventId) {
    return "event " + what.eventId + " is gone: another instance finished or removed it (" + err.message + ")";
  }
  if (err.status === 409 && what && what.eventId) {
    return "event " + what.eventId + " changed meanwhile and is no longer " + (what.needs || "in that state") +
      " (another instance or person acted on it): " + err.message;
  }
  return err.message;
}

function flash(kind, message) {
  const el = document.getElementById("flash");
  el.hidden = false;
  el.className = kind;
  el.textContent = message;
  el.dataset.kind = kind;
}

function clearFlash() {
  const el = document.getElementById("flash");
  el.hidden = true;
  el.textContent = "";
}

function age(secs) {
  if (secs === null || secs === undefined) return "–";
  secs = Math.max(0, Math.round(secs));
  if (secs < 60) return secs + " s";
  if (secs < 3600) return Math.floor(secs / 60) + " min " + (secs % 60) + " s";
  if (secs < 86400) return Math.floor(secs / 3600) + " h " + Math.floor((secs % 3600) / 60) + " min";
  return Math.floor(secs / 86400) + " d " + Math.floor((secs % 86400) / 3600) + " h";
}

function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function badge(state) {
  return h("span", { class: "badge " + state }, state);
}

function short(text, n) {
  if (!text) return "";
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

function queryOf(hash) {
  const i = hash.indexOf("?");
  return new URLSearchParams(i < 0 ? "" : hash.slice(i + 1));
}

// ---------------------------------------------------------------- pages
// Each page renders into `main` once and returns an object whose
// refresh() the poller calls; a page keeps its own DOM (forms keep what
// the user typed) and only swaps the data parts.

const pages = {};

pages.overview = function (main) {
  const info = h("p", { class: "muted", id: "counted" }, "Counting…");
  const cards = h("div", { class: "cards", id: "totals" });
  const table = h("table", { id: "names" });
  const charts = h("div", { class: "charts" });
  main.append(
    h("h1", {}, "Overview"),
    info,
    cards,
    h("h2", {}, "Event names"),
    table,
    h("h2", { id: "charts-title" }, "Last hour"),
    charts,
  );

  async function togglePause(name, paused) {
    try {
      const r = await api("POST", paused ? "/v1/pauses/resume" : "/v1/pauses", { name, force: paused ? undefined : true });
      flash("ok", (paused ? "resumed " : "paused ") + (r.names.join(", ") || name));
      await refresh();
    } catch (e) {
      flash("error", explain(e));
    }
  }

  async function refresh() {
    const o = await api("GET", "/v1/overview");
    info.textContent = o.counted_at
      ? "Counts from " + age(o.age_secs) + " ago (a background count every 10 s or more; it took " + o.count_ms + " ms)."
      : "Counting… (the first count starts now)";
    info.dataset.counted = o.counted_at ? "yes" : "no";
    const t = o.totals;
    cards.replaceChildren(
      ...[
        ["pending", t.pending],
        ["scheduled", t.scheduled],
        ["running", t.running],
        ["dead", t.dead],
        ["oldest pending", t.pending ? age(t.oldest_pending_age_secs) : "–"],
        ["paused names", o.paused.length],
      ].map(([l, n]) => h("div", { class: "card" }, h("div", { class: "n", "data-total": l }, n), h("div", { class: "l" }, l))),
    );
    table.replaceChildren(
      h("tr", {},
        h("th", {}, "name"), h("th", { class: "num" }, "live"), h("th", { class: "num" }, "pending"),
        h("th", { class: "num" }, "scheduled"), h("th", { class: "num" }, "running"), h("th", { class: "num" }, "dead"),
        h("th", { class: "num" }, "oldest pending"), h("th", {}, "state"), h("th", {}, "")),
      ...o.names.map((n) =>
        h("tr", { "data-name": n.name },
          h("td", {}, h("a", { href: "#/events?name=" + encodeURIComponent(n.name) }, n.name)),
          h("td", { class: "num", "data-col": "live" }, n.live),
          h("td", { class: "num", "data-col": "pending" }, n.pending),
          h("td", { class: "num", "data-col": "scheduled" }, n.scheduled),
          h("td", { class: "num", "data-col": "running" }, n.running),
          h("td", { class: "num", "data-col": "dead" },
            n.dead ? h("a", { href: "#/dead?name=" + encodeURIComponent(n.name) }, n.dead) : 0),
          h("td", { class: "num" }, n.pending ? age(n.oldest_pending_age_secs) : "–"),
          h("td", {}, n.paused ? badge("paused") : "claimed"),
          h("td", {}, h("button", {
            "data-action": n.paused ? "resume" : "pause",
            onclick: () => togglePause(n.name, n.paused),
          }, n.paused ? "Resume" : "Pause")),
        )),
      h("tr", { class: "totals" },
        h("td", {}, "total"),
        h("td", { class: "num" }, t.pending + t.scheduled + t.running),
        h("td", { class: "num" }, t.pending), h("td", { class: "num" }, t.scheduled),
        h("td", { class: "num" }, t.running), h("td", { class: "num" }, t.dead),
        h("td", { class: "num" }, t.pending ? age(t.oldest_pending_age_secs) : "–"), h("td", {}), h("td", {})),
    );
    document.getElementById("charts-title").textContent =
      "Last hour on this instance (" + o.instance + "; each instance counts its own handler runs)";
    charts.replaceChildren(throughputChart(o.timeline), latencyChart(o.timeline));
  }
  return { refresh };
};

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function throughputChart(minutes) {
  const W = 600, H = 140, pad = 18;
  const max = Math.max(1, ...minutes.map((m) => m.acked + m.failed + m.dead));
  const bw = (W - pad) / minutes.length;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "events per minute" });
  minutes.forEach((m, i) => {
    let y = H - pad;
    for (const [v, color] of [[m.acked, "#2e7d32"], [m.failed, "#b26a00"], [m.dead, "#c62828"]]) {
      if (!v) continue;
      const hgt = ((H - 2 * pad) * v) / max;
      y -= hgt;
      const r = s("rect", { x: pad + i * bw, y, width: Math.max(1, bw - 1), height: hgt, fill: color });
      const title = s("title", {});
      title.textContent = when(m.at) + ": " + m.acked + " acked, " + m.failed + " failed, " + m.dead + " dead";
      r.append(title);
      svg.append(r);
    }
  });
  const lab = s("text", { x: pad, y: 12, "font-size": 11, fill: "#66707a" });
  lab.textContent = "max " + max + " / min";
  svg.append(lab, s("line", { x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#dde2e7" }));
  const total = minutes.reduce((a, m) => a + m.acked, 0);
  return h("div", { class: "chart" },
    h("strong", {}, "Throughput per minute "), h("span", { class: "muted", "data-acked-hour": total }, "(" + total + " acked this hour)"),
    svg,
    h("div", { class: "legend" },
      h("span", {}, h("i", { class: "sw acked" }), "acked"),
      h("span", {}, h("i", { class: "sw failed" }), "failed"),
      h("span", {}, h("i", { class: "sw dead" }), "dead")));
}

function latencyChart(minutes) {
  const W = 600, H = 140, pad = 18;
  const max = Math.max(1, ...minutes.map((m) => m.latency_ms_mean));
  const step = (W - pad) / Math.max(1, minutes.length - 1);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "mean handler latency per minute" });
  const pts = minutes
    .map((m, i) => [pad + i * step, H - pad - ((H - 2 * pad) * m.latency_ms_mean) / max, m])
    .filter(([, , m]) => m.attempts > 0);
  if (pts.length) {
    svg.append(s("polyline", { points: pts.map(([x, y]) => x + "," + y).join(" "), fill: "none", stroke: "#1f6feb", "stroke-width": 2 }));
    for (const [x, y, m] of pts) {
      const c = s("circle", { cx: x, cy: y, r: 2.5, fill: "#1f6feb" });
      const title = s("title", {});
      title.textContent = when(m.at) + ": mean " + m.latency_ms_mean.toFixed(1) + " ms over " + m.attempts + " attempts";
      c.append(title);
      svg.append(c);
    }
  }
  const lab = s("text", { x: pad, y: 12, "font-size": 11, fill: "#66707a" });
  lab.textContent = "max " + max.toFixed(1) + " ms";
  svg.append(lab, s("line", { x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#dde2e7" }));
  return h("div", { class: "chart" }, h("strong", {}, "Handler latency (mean per minute)"), svg);
}

function eventsTable(events, opts) {
  return h("table", { id: opts.id || "events" },
    h("tr", {},
      opts.select ? h("th", {}, "") : null,
      h("th", {}, "id"), h("th", {}, "name"), h("th", {}, "state"), h("th", {}, "group"),
      h("th", { class: "num" }, "retry"), h("th", {}, opts.dead ? "died" : "created"), h("th", {}, "last error"),
      opts.actions ? h("th", {}, "") : null),
    ...events.map((e) =>
      h("tr", { "data-id": e.id },
        h("td", {}, h("a", { class: "mono", href: "#/event/" + e.id }, e.id)),
        h("td", {}, e.name),
        h("td", {}, badge(e.state)),
        h("td", {}, e.group_id || ""),
        h("td", { class: "num" }, e.retry + "/" + e.max_retry),
        h("td", {}, when(opts.dead ? e.dead_at || e.create_date : e.create_date)),
        h("td", { class: "mono", title: e.last_error || "" }, short(e.last_error, 80)),
        opts.actions ? h("td", {}, opts.actions(e)) : null)),
    events.length ? null : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No events match.")));
}

// A listing with filters and cursor pagination, for the events browser and
// the dead letters (which adds bulk actions).
function listing(main, { dead, title }) {
  const q = queryOf(location.hash);
  const field = (name, label, attrs) =>
    h("label", {}, label, h("input", Object.assign({ name, value: q.get(name) || "" }, attrs || {})));
  const stateSel = h("select", { name: "state" },
    ...["live", "pending", "scheduled", "running"].map((v) => h("option", { value: v, selected: q.get("state") === v }, v)));
  const form = h("form", { class: "filters", id: "filters" },
    dead ? null : h("label", {}, "state", stateSel),
    field("name", "name"),
    dead ? null : field("group", "group"),
    field("error", "last error contains"),
    field("since", dead ? "died since (1h, RFC 3339)" : "created since (1h, RFC 3339)", { size: 12 }),
    h("button", { type: "submit", class: "primary" }, "Filter"));
  const body = h("div", { id: "listing" });
  const pager = h("div", { class: "actions" });
  const bulk = h("div", { class: "actions", id: "bulk" });
  main.append(h("h1", {}, title), form, dead ? bulk : null, body, pager);

  // Cursors of the pages shown so far; the last is the page on screen.
  const cursors = [null];
  function filters() {
    const f = new FormData(form);
    const p = new URLSearchParams();
    p.set("state", dead ? "dead" : f.get("state") || "live");
    if (f.get("name")) p.set("name", f.get("name"));
    if (!dead && f.get("group")) p.set("group", f.get("group"));
    if (f.get("error")) p.set("error_contains", f.get("error"));
    if (f.get("since")) p.set("since", f.get("since"));
    return p;
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const p = new URLSearchParams();
    for (const [k, v] of f) if (v && !(k === "state" && v === "live")) p.set(k, v);
    const next = "#/" + (dead ? "dead" : "events") + (p.toString() ? "?" + p : "");
    if (location.hash === next) route();
    else location.hash = next;
  });

  async function replayOne(e) {
    try {
      await api("POST", "/v1/events/" + e.id + "/replay");
      flash("ok", "event " + e.id + " replayed: it runs again");
    } catch (err) {
      flash("error", explain(err, { eventId: e.id, needs: "dead" }));
    }
    await refresh();
  }

  function bulkBody() {
    const f = new FormData(form);
    const b = {};
    if (f.get("name")) b.name = f.get("name");
    if (f.get("error")) b.error_contains = f.get("error");
    if (f.get("since")) b.since = f.get("since");
    return b;
  }
  async function bulkAction(kind) {
    try {
      const dry = await api("POST", "/v1/events/" + kind, Object.assign({ dry_run: true }, bulkBody()));
      bulk.replaceChildren(
        h("span", { id: "bulk-confirm" }, dry.matched + " dead events match these filters. " + kind + " them?"),
        h("button", {
          class: kind === "purge" ? "danger" : "primary", "data-action": "confirm-" + kind,
          onclick: async () => {
            try {
              const r = await api("POST", "/v1/events/" + kind, bulkBody());
              flash("ok", (kind === "replay" ? "replayed " : "purged ") + r.matched + " dead events");
            } catch (err) {
              flash("error", explain(err));
            }
            bulkButtons();
            await refresh();
          },
        }, "Yes, " + kind + " " + dry.matched),
        h("button", { onclick: bulkButtons }, "No"));
    } catch (err) {
      flash("error", explain(err));
    }
  }
  function bulkButtons() {
    bulk.replaceChildren(
      h("span", { class: "muted" }, "Every dead event matching the filters:"),
      h("button", { "data-action": "bulk-replay", onclick: () => bulkAction("replay") }, "Replay all matching…"),
      h("button", { class: "danger", "data-action": "bulk-purge", onclick: () => bulkAction("purge") }, "Purge all matching…"));
  }
  if (dead) bulkButtons();

  async function refresh() {
    const p = filters();
    p.set("limit", q.get("limit") || "50");
    const cursor = cursors[cursors.length - 1];
    if (cursor) p.set("cursor", cursor);
    const page = await api("GET", "/v1/events?" + p);
    body.replaceChildren(eventsTable(page.events, {
      dead,
      actions: dead ? (e) => h("button", { "data-action": "replay", onclick: () => replayOne(e) }, "Replay") : null,
    }));
    pager.replaceChildren(
      h("span", { class: "muted" }, "page " + cursors.length),
      cursors.length > 1 ? h("button", { onclick: () => { cursors.length = 1; refresh().catch(showError); } }, "First page") : null,
      page.next_cursor ? h("button", { "data-action": "next", onclick: () => { cursors.push(page.next_cursor); refresh().catch(showError); } }, "Next page") : null);
  }
  return { refresh };
}

pages.events = (main) => listing(main, { dead: false, title: "Events" });
pages.dead = (main) => listing(main, { dead: true, title: "Dead letters" });

pages.event = function (main, id) {
  const box = h("div", { id: "event" });
  const actions = h("div", { class: "actions" });
  const attempts = h("div", {});
  const payload = h("pre", { id: "payload" });
  const payloadPart = h("div", {}, h("h2", {}, "Payload"), payload);
  main.append(h("h1", {}, "Event ", h("span", { class: "mono" }, id)), actions, box,
    payloadPart, h("h2", {}, "Attempts"), attempts);
  let gone = false;

  async function act(kind, needs) {
    try {
      await api("POST", "/v1/events/" + id + "/" + kind);
      flash("ok", "event " + id + (kind === "replay" ? " replayed: it runs again" : " cancelled: it is dead"));
    } catch (err) {
      flash("error", explain(err, { eventId: id, needs }));
    }
    await refresh();
  }

  async function refresh() {
    let e;
    try {
      e = await api("GET", "/v1/events/" + id);
    } catch (err) {
      if (err.status !== 404) throw err;
      // Handled and deleted (or purged): its attempt record may remain.
      if (!gone) {
        gone = true;
        box.replaceChildren(h("p", { id: "gone" }, "Event " + id + " is gone: it was handled and deleted, or purged (another instance may have finished it)."));
        actions.replaceChildren();
        payload.textContent = "";
        payloadPart.hidden = true;
      }
      try {
        const a = await api("GET", "/v1/events/" + id + "/attempts");
        attempts.replaceChildren(attemptsTable(a));
      } catch (_) {
        attempts.replaceChildren(h("p", { class: "muted" }, "No attempts recorded."));
      }
      return;
    }
    gone = false;
    payloadPart.hidden = false;
    box.replaceChildren(h("dl", { class: "kv" },
      ...[
        ["name", e.name], ["state", badge(e.state)], ["group", e.group_id || "–"],
        ["retry", e.retry + " of " + e.max_retry], ["deferrals", e.deferrals],
        ["created", when(e.create_date)], ["available at", when(e.available_at)],
        ["expires at", when(e.expires_at)], ["locked by", e.locked_by || "–"],
        ["locked until", when(e.locked_until)], ["died", when(e.dead_at)],
        ["idempotency key", e.idempotency_key || "–"], ["last error", e.last_error || "–"],
      ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
    payload.textContent = JSON.stringify(e.payload, null, 2);
    actions.replaceChildren(
      h("button", { class: "primary", "data-action": "replay", disabled: !e.dead, onclick: () => act("replay", "dead") }, "Replay"),
      h("button", { class: "danger", "data-action": "cancel", disabled: e.dead, onclick: () => act("cancel", "live") }, "Cancel"),
      h("a", { href: "#/events?name=" + encodeURIComponent(e.name) }, "more " + e.name + " events"));
    attempts.replaceChildren(attemptsTable(e.attempts));
  }
  return { refresh };
};

function attemptsTable(list) {
  if (!list.length) return h("p", { class: "muted" }, "No attempts recorded.");
  const cols = Object.keys(list[0]);
  return h("table", { id: "attempts" },
    h("tr", {}, ...cols.map((c) => h("th", {}, c))),
    ...list.map((a) => h("tr", {}, ...cols.map((c) => {
      const v = a[c];
      return h("td", { class: typeof v === "number" ? "num" : "" },
        v === null || v === undefined ? "–" : /_at$/.test(c) ? when(v) : typeof v === "object" ? JSON.stringify(v) : v);
    }))));
}

pages.handlers = function (main) {
  const list = h("div", { id: "handlers" });
  main.append(h("h1", {}, "Handlers"), list);
  async function refresh() {
    const hs = await api("GET", "/v1/handlers");
    if (!hs.length) {
      list.replaceChildren(h("p", { class: "muted" }, "No handlers serve on this instance (or they are still loading)."));
      return;
    }
    list.replaceChildren(...hs.map((x) => {
      const c = x.capabilities || {};
      const st = x.settings || {};
      const caps = [
        c.emit && c.emit.length ? "emit: " + c.emit.join(", ") : null,
        c.kv ? "kv prefix: " + c.kv : null,
        c.http && c.http.length ? "http: " + c.http.join(", ") : null,
        c.sql ? "sql" : null,
        c.publish && c.publish.length ? "publish: " + c.publish.join(", ") : null,
        c.config_keys && c.config_keys.length ? "config keys: " + c.config_keys.join(", ") : null,
      ].filter(Boolean);
      return h("section", { class: "handler", "data-handler": x.name },
        h("h2", {}, x.name, " ", h("span", { class: "badge mono", title: x.hash }, x.hash.slice(0, 12))),
        h("div", { class: "grid2" },
          h("dl", { class: "kv" },
            h("dt", {}, "module"), h("dd", { class: "mono" }, x.module),
            h("dt", {}, "version"), h("dd", { class: "mono" }, x.hash),
            h("dt", {}, "loaded"), h("dd", {}, when(x.loaded_at)),
            h("dt", {}, "events"), h("dd", {}, x.events.join(", ")),
            h("dt", {}, "timeout"), h("dd", {}, st.timeout_ms + " ms"),
            h("dt", {}, "memory"), h("dd", {}, Math.round(st.memory_bytes / 1048576) + " MiB"),
            h("dt", {}, "concurrency"), h("dd", {}, st.concurrency == null ? "no cap" : st.concurrency),
            h("dt", {}, "max retry"), h("dd", {}, st.max_retry == null ? "the event's" : st.max_retry),
            h("dt", {}, "instances"), h("dd", {}, st.instances)),
          h("dl", { class: "kv" },
            h("dt", {}, "capabilities"), h("dd", {}, caps.length ? caps.join("; ") : "none (pure function)"),
            h("dt", {}, "[[limit]]s"), h("dd", {}, x.rate_limits.length ? x.rate_limits.map((l) => l.id + ": " + l.describe).join("; ") : "none"))),
        h("h2", {}, "Reloads on this instance"),
        x.reloads.length
          ? h("table", {}, h("tr", {}, h("th", {}, "at"), h("th", {}, "from"), h("th", {}, "to"), h("th", { class: "num" }, "took")),
            ...x.reloads.slice().reverse().map((r) => h("tr", {},
              h("td", {}, when(r.at)), h("td", { class: "mono" }, r.old), h("td", { class: "mono" }, r.new),
              h("td", { class: "num" }, r.elapsed_ms + " ms"))))
          : h("p", { class: "muted" }, "None since this instance started."));
    }));
  }
  return { refresh };
};

// ---------------------------------------------------------------- router

let current = null;

function showError(err) {
  flash("error", explain(err));
}

function route() {
  const hash = location.hash || "#/";
  const path = hash.slice(1).split("?")[0];
  const main = document.getElementById("page");
  main.replaceChildren();
  let name, page;
  const m = path.match(/^\/event\/([0-9a-fA-F-]{36})$/);
  if (m) {
    name = "event";
    page = pages.event(main, m[1]);
  } else {
    name = { "/": "overview", "/events": "events", "/dead": "dead", "/handlers": "handlers" }[path] || "overview";
    page = pages[name](main);
  }
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === name || (name === "event" && a.dataset.nav === "events")));
  document.body.dataset.page = name;
  current = page;
  tick(true);
}

let inflight = false;
async function tick(force) {
  if (!current || inflight || (document.hidden && !force)) return;
  inflight = true;
  const page = current;
  try {
    await page.refresh();
    document.getElementById("live-state").textContent = "updated " + new Date().toLocaleTimeString() + " · every " + POLL_MS / 1000 + " s";
  } catch (err) {
    if (page === current) showError(err);
  } finally {
    inflight = false;
  }
}

window.addEventListener("hashchange", () => {
  clearFlash();
  route();
});
// Polling stops while the tab is hidden and catches up when it shows.
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) tick(true);
});
setInterval(() => tick(false), POLL_MS);

function showToken() {
  const input = document.getElementById("token");
  input.value = token();
  document.getElementById("token-state").textContent = token() ? "set for this tab" : "not set";
}
document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = document.getElementById("token").value.trim();
  if (v) sessionStorage.setItem(TOKEN_KEY, v);
  else sessionStorage.removeItem(TOKEN_KEY);
  showToken();
  clearFlash();
  tick(true);
});
showToken();
route();
