// Drives the outrun dashboard in Debian's headless chromium. Run by
// tests/dashboard.rs (dashboard_in_a_browser), which starts `outrun serve`,
// seeds the events and passes, in the environment:
//   DASHBOARD_URL, API_URL, ADMIN_TOKEN, CLI_STATS (`outrun events stats
//   --json --by-name`), REPLAY_ID and DELETED_DEAD_ID (dead letters),
//   VANISHING_ID (a scheduled event), ARTIFACTS (screenshot directory).
// When another process must delete an event, it prints `DELETE <id>` and
// waits for `DELETED` on stdin. Plain node, no test runner: any failed
// check throws, and the exit code is the verdict.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { join } from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (run this through tests/dashboard.rs)`);
  return v;
};
const UI = env("DASHBOARD_URL");
const API = env("API_URL");
const TOKEN = env("ADMIN_TOKEN");
const CLI = JSON.parse(env("CLI_STATS"));
const REPLAY_ID = env("REPLAY_ID");
const DELETED_DEAD_ID = env("DELETED_DEAD_ID");
const VANISHING_ID = env("VANISHING_ID");
const ARTIFACTS = env("ARTIFACTS");

const stdin = createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();
async function deleteElsewhere(id) {
  console.log(`DELETE ${id}`);
  const { value } = await lines.next();
  if (value !== "DELETED") throw new Error(`the test answered ${value} to DELETE ${id}`);
}

function check(ok, message) {
  if (!ok) throw new Error(message);
  console.log(`ok: ${message}`);
}

async function api(path, opts = {}) {
  const res = await fetch(API + path, {
    ...opts,
    headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
  });
  return { status: res.status, body: await res.json().catch(() => null) };
}

async function until(what, fn, ms = 30000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true });
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
page.on("console", (m) => {
  // The browser logs every 401/404 answer; those are expected here.
  if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) errors.push(m.text());
});
const external = [];
page.on("request", (r) => {
  if (!r.url().startsWith(API)) external.push(r.url());
});
const shot = (name) => page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
const flash = async () => (await page.textContent("#flash")) || "";

try {
  // ------------------------------------------------------------ overview
  await page.goto(UI);
  await page.waitForSelector('#counted[data-counted="yes"]', { timeout: 30000 });
  // The counts are a background count: wait until it has caught up with
  // the CLI's (the seeded events hold still: scheduled, paused, dead).
  await until("the overview totals to match `outrun events stats`", async () => {
    for (const k of ["pending", "scheduled", "running", "dead"]) {
      const shown = await page.textContent(`[data-total="${k}"]`);
      if (Number(shown) !== CLI[k]) return false;
    }
    return true;
  });
  for (const n of CLI.by_name) {
    const row = page.locator(`tr[data-name="${n.name}"]`);
    for (const k of ["pending", "scheduled", "running", "dead"]) {
      const shown = Number(await row.locator(`[data-col="${k}"]`).textContent());
      check(shown === n[k], `overview ${n.name} ${k} = ${shown}, CLI says ${n[k]}`);
    }
  }
  check(
    (await page.locator('tr[data-name="report.nightly"] .badge.paused').count()) === 1,
    "report.nightly shows as paused, as `outrun events stats` says",
  );
  const title = await page.textContent("#charts-title");
  check(/this instance/.test(title) && /each instance counts its own/.test(title), `charts say they are per instance: ${title}`);
  await shot("overview");

  // ----------------------------------------- an action without the token
  await page.locator('tr[data-name="probe.version"] button[data-action="pause"]').click();
  await until("the token message", async () => /this action needs the admin token/.test(await flash()));
  check(true, `pause without the token: "${await flash()}"`);
  let pauses = await api("/v1/pauses");
  check(pauses.body.map((p) => p.name).join() === "report.nightly", "nothing was paused without the token");
  // Also on the event page: cancel without the token changes nothing.
  const keep = (await api("/v1/events?state=scheduled&name=probe.version")).body.events.find((e) => e.id !== VANISHING_ID);
  await page.goto(`${UI}#/event/${keep.id}`);
  await page.waitForSelector("#payload:not(:empty)");
  await page.click('button[data-action="cancel"]');
  await until("the token message on the event page", async () => /needs the admin token/.test(await flash()));
  check((await api(`/v1/events/${keep.id}`)).body.state === "scheduled", "the event is still scheduled after a token-less cancel");

  // ------------------------------------------------------- with the token
  await page.fill("#token", TOKEN);
  await page.click('#token-form button[type="submit"]');
  check((await page.textContent("#token-state")).includes("set"), "the token is kept for this tab");
  check(
    (await page.evaluate(() => sessionStorage.getItem("outrun.admin.token"))) === TOKEN,
    "the token lives in sessionStorage",
  );

  // ------------------------------------------------ pause and resume a name
  await page.goto(`${UI}#/`);
  await page.waitForSelector('tr[data-name="probe.version"] button[data-action="pause"]');
  await page.locator('tr[data-name="probe.version"] button[data-action="pause"]').click();
  await until("the pause", async () => (await api("/v1/pauses")).body.some((p) => p.name === "probe.version"));
  await until("the pause message", async () => /paused probe.version/.test(await flash()));
  check(true, `paused from the UI: "${await flash()}"`);
  await page.waitForSelector('tr[data-name="probe.version"] button[data-action="resume"]');
  await shot("overview-paused");
  await page.locator('tr[data-name="probe.version"] button[data-action="resume"]').click();
  await until("the resume", async () => !(await api("/v1/pauses")).body.some((p) => p.name === "probe.version"));
  await until("the resume message", async () => /resumed probe.version/.test(await flash()));
  check(true, `resumed from the UI: "${await flash()}"`);

  // ------------------------------------------ dead letters: replay one
  await page.goto(`${UI}#/dead`);
  await page.waitForSelector(`tr[data-id="${REPLAY_ID}"]`);
  check(
    (await page.locator('#events tr[data-id]').count()) === CLI.dead,
    `the dead letters page lists the ${CLI.dead} dead events`,
  );
  await shot("dead-letters");
  await page.locator(`tr[data-id="${REPLAY_ID}"] button[data-action="replay"]`).click();
  await until("the replay message", async () => (await flash()).includes(`event ${REPLAY_ID} replayed`));
  // It ran: the row is gone and its handler's attempt is recorded done.
  await until("the replayed event to run", async () => (await api(`/v1/events/${REPLAY_ID}`)).status === 404);
  const attempts = await until("its done attempt", async () => {
    const a = await api(`/v1/events/${REPLAY_ID}/attempts`);
    return a.status === 200 && a.body.some((x) => x.outcome === "done") && a.body;
  });
  check(true, `the replayed dead letter ran: ${JSON.stringify(attempts.at(-1))}`);
  // The overview's throughput chart counts it (this instance ran it).
  await page.goto(`${UI}#/`);
  const acked = await until("the chart to count the ack", async () => {
    const n = Number(await page.getAttribute("[data-acked-hour]", "data-acked-hour"));
    return n >= 1 && n;
  });
  check(true, `the throughput chart counts ${acked} acked this hour`);
  await page.goto(`${UI}#/dead`);

  // Bulk: the dry run counts what a bulk replay would take, then No.
  await page.fill('#filters input[name="error"]', "card declined");
  await page.click('#filters button[type="submit"]');
  await page.waitForFunction(() => document.querySelectorAll("#events tr[data-id]").length === 1);
  await page.click('button[data-action="bulk-replay"]');
  await page.waitForSelector("#bulk-confirm");
  check((await page.textContent("#bulk-confirm")).startsWith("1 dead events match"), `bulk dry run: ${await page.textContent("#bulk-confirm")}`);
  await page.click("#bulk button:has-text('No')");

  // A dead letter another process deletes while the page shows it.
  await page.goto(`${UI}#/dead`);
  await page.waitForSelector(`tr[data-id="${DELETED_DEAD_ID}"]`);
  await deleteElsewhere(DELETED_DEAD_ID);
  await page.locator(`tr[data-id="${DELETED_DEAD_ID}"] button[data-action="replay"]`).click();
  await until("the gone message", async () => (await flash()).includes(`event ${DELETED_DEAD_ID} is gone`));
  check(/another instance finished or removed it/.test(await flash()), `replay of a deleted event: "${await flash()}"`);

  // ------------------------------------------------ event page, and polling
  await page.goto(`${UI}#/event/${VANISHING_ID}`);
  await page.waitForSelector("#payload:not(:empty)");
  check((await page.textContent("#event")).includes("scheduled"), "the event page shows the state");
  await shot("event");
  // A hidden tab does not poll.
  await page.evaluate(() => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await new Promise((r) => setTimeout(r, 500));
  let polled = 0;
  const count = (r) => {
    if (r.url().includes("/v1/")) polled++;
  };
  page.on("request", count);
  await new Promise((r) => setTimeout(r, 4000));
  page.off("request", count);
  check(polled === 0, `no polling while the tab is hidden (${polled} requests in 4 s)`);
  // Another instance finishes (deletes) the event; the user clicks Cancel.
  await deleteElsewhere(VANISHING_ID);
  await page.click('button[data-action="cancel"]');
  await until("the gone message", async () => (await flash()).includes(`event ${VANISHING_ID} is gone`));
  check(/another instance finished or removed it/.test(await flash()), `cancel of a deleted event: "${await flash()}"`);
  await page.waitForSelector("#gone");
  await page.evaluate(() => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => false });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await shot("event-gone");

  // ------------------------------------------------------- events browser
  await page.goto(`${UI}#/events?name=probe.version`);
  await page.waitForSelector("#events tr[data-id]");
  const listed = await page.locator("#events tr[data-id]").count();
  check(listed === 3, `the events browser lists probe.version's 3 live events (${listed})`);
  // The page keeps working after the errors above: another filter, then
  // cursor pagination over three pages of one.
  await page.goto(`${UI}#/events?state=pending&name=report.nightly`);
  await page.waitForFunction(() => document.querySelectorAll("#events tr[data-id]").length === 3);
  await shot("events");
  // Cursor pagination, one event per page: three pages, then no next.
  await page.goto(`${UI}#/events?state=pending&name=report.nightly&limit=1`);
  const seen = [];
  for (let i = 0; i < 3; i++) {
    await page.waitForFunction((n) => document.querySelector("#listing + .actions .muted")?.textContent === `page ${n}`, i + 1);
    const ids = await page.locator("#events tr[data-id]").evaluateAll((rows) => rows.map((r) => r.dataset.id));
    check(ids.length === 1 && !seen.includes(ids[0]), `page ${i + 1} shows one new event`);
    seen.push(ids[0]);
    if (i < 2) await page.click('button[data-action="next"]');
  }
  check((await page.locator('button[data-action="next"]').count()) === 0, "the last page has no next button");

  // -------------------------------------------------------------- handlers
  await page.goto(`${UI}#/handlers`);
  await page.waitForSelector('section[data-handler="probe"]');
  const handlers = (await api("/v1/handlers")).body;
  const probe = handlers.find((h) => h.name === "probe");
  const text = await page.textContent('section[data-handler="probe"]');
  check(text.includes(probe.hash), "the handlers page shows the version (module hash)");
  check(probe.reloads.length === 1 && text.includes(probe.reloads[0].new) && text.includes(probe.reloads[0].old), "the reload history shows the v1 -> v2 reload");
  check(text.includes("sql") && text.includes("emit: probe.version"), "granted capabilities are shown");
  check(text.includes("event:probe.version") && text.includes("100/s"), "the [[limit]] is shown");
  check(text.includes("5000 ms"), "the timeout is shown");
  await shot("handlers");

  check(external.length === 0, `no request left the outrun server: ${external.join(", ")}`);
  check(errors.length === 0, `no script errors: ${errors.join(" | ")}`);
} catch (e) {
  await shot("failure").catch(() => {});
  console.error(`dashboard.spec.mjs failed: ${e.stack || e}`);
  console.error(`flash: ${await flash().catch(() => "?")}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
process.exit(0);
