// The audit timeline page: sign in with an API key, search, draw one request's events.
// The access token lives in this closure only (never in storage, never in a cookie).
"use strict";

(() => {
  let token = null;
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function ms(value) {
    if (value === null || value === undefined) return "";
    if (Math.abs(value) < 1000) return `${value} ms`;
    return `${(value / 1000).toFixed(value < 10000 ? 2 : 1)} s`;
  }

  function utc(iso) {
    return iso ? iso.replace("T", " ").replace(/(\.\d{3})\d*/, "$1").replace(/\+00:00$|Z$/, "") : "";
  }

  function showLogin(message) {
    token = null;
    $("app").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("chain").textContent = "Chain: not checked yet";
    $("chain").className = "chain";
    $("api-key").focus();
  }

  async function api(path, params) {
    const url = new URL(path, window.location.origin);
    for (const [name, value] of Object.entries(params || {})) {
      if (value) url.searchParams.set(name, value);
    }
    const answer = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });
    if (answer.status === 401) {
      showLogin("Your session expired: sign in again.");
      throw new Error("signed out");
    }
    const body = await answer.json().catch(() => null);
    return { status: answer.status, body };
  }

  function problem(body, fallback) {
    return (body && (body.detail || body.title)) || fallback;
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("api-key");
    $("login-error").textContent = "";
    const answer = await fetch("/audit/ui/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ api_key: key.value.trim() }),
    });
    const body = await answer.json().catch(() => null);
    key.value = "";
    if (answer.status !== 200 || !body) {
      $("login-error").textContent = problem(body, "Signing in failed.");
      key.focus();
      return;
    }
    token = body.access_token;
    $("login").hidden = true;
    $("app").hidden = false;
    $("correlation-id").focus();
    checkChain();
  }

  async function checkChain() {
    const chain = $("chain");
    chain.textContent = "Chain: verifying…";
    let result;
    try {
      result = await api("/audit/verify");
    } catch {
      return;
    }
    const { status, body } = result;
    if (status === 200 && body && body.ok) {
      chain.className = "chain ok";
      chain.textContent = `Chain verified: ${body.entries} entries` +
        (body.checkpoint ? `, signed checkpoint at ${body.checkpoint.seq}` : "");
    } else if (status === 200 && body) {
      chain.className = "chain bad";
      chain.textContent = `Chain broken at entry ${body.broken_at}: ${body.reason}`;
    } else if (status === 403) {
      chain.className = "chain";
      chain.textContent = "Chain: not checked (the key's owner lacks audit:verify)";
    } else {
      chain.className = "chain bad";
      chain.textContent = `Chain: ${problem(body, "verification failed")}`;
    }
  }

  function asUtc(value) {
    return value ? `${value.length === 16 ? `${value}:00` : value}Z` : "";
  }

  async function search(event) {
    event.preventDefault();
    const status = $("search-status");
    const correlationId = $("correlation-id").value.trim();
    $("requests").hidden = true;
    $("timeline").hidden = true;
    if (correlationId) {
      await drawTimeline(correlationId);
      return;
    }
    let user = $("user-id").value.trim();
    if (user && !user.includes("/")) user = `users/${user}`;
    const params = {
      subject: user,
      type: $("event-type").value.trim(),
      from: asUtc($("from").value),
      to: asUtc($("to").value),
      limit: "500",
    };
    if (!params.subject && !params.type && !params.from && !params.to) {
      status.textContent = "Give a correlation id, a user id, an event type or a time range.";
      $("correlation-id").focus();
      return;
    }
    status.textContent = "Searching…";
    let result;
    try {
      result = await api("/audit", params);
    } catch {
      return;
    }
    if (result.status !== 200) {
      status.textContent = problem(result.body, "The search failed.");
      return;
    }
    const groups = new Map();
    for (const entry of result.body.entries) {
      const key = entry.correlation_id || "";
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(entry);
    }
    const body = $("requests-body");
    body.replaceChildren();
    for (const [key, entries] of groups) {
      const first = entries[0];
      const cell = key
        ? el("button", { type: "button", className: "link" }, key)
        : el("span", { className: "ids" }, "(none)");
      if (key) cell.addEventListener("click", () => {
        $("correlation-id").value = key;
        drawTimeline(key);
      });
      body.append(el("tr", {},
        el("td", {}, cell),
        el("td", {}, el("code", {}, first.type.replace(/^com\.tributary\./, ""))),
        el("td", { className: "time" }, utc(first.event_time)),
        el("td", {}, entries.length)));
    }
    const more = result.body.next ? " (the first 500; narrow the search for the rest)" : "";
    status.textContent = `${result.body.entries.length} events in ${groups.size} requests${more}.`;
    $("requests").hidden = groups.size === 0;
  }

  function hopCell(hop) {
    if (!hop) return el("td", {}, "");
    if (hop.status === "dead_lettered") {
      const after = hop.after_ms === null ? "" : `, +${ms(hop.after_ms)}`;
      return el("td", { className: "dead" },
        el("strong", {}, `✗ dead-lettered: ${hop.reason}`), el("br"),
        `attempts: ${hop.attempts}${after}`);
    }
    if (hop.status === "handled") {
      return el("td", { className: "handled" }, `✓ replied +${ms(hop.after_ms)}`, el("br"),
        el("span", { className: "ids" }, hop.reply));
    }
    if (hop.status === "recorded") {
      return el("td", { className: "handled" }, `✓ recorded +${ms(hop.after_ms)}`);
    }
    return el("td", { className: "unknown" }, "no record");
  }

  async function drawTimeline(correlationId) {
    const status = $("search-status");
    status.textContent = "Loading the timeline…";
    let result;
    try {
      result = await api("/audit/timeline", { correlation_id: correlationId });
    } catch {
      return;
    }
    if (result.status !== 200) {
      status.textContent = problem(result.body, "The timeline could not be loaded.");
      return;
    }
    const data = result.body;
    const span = Math.max(1, ...data.events.map((e) => e.offset_ms || 0),
      ...data.dead_letters.map((d) => d.offset_ms || 0));
    const head = $("timeline-head");
    head.replaceChildren(el("tr", {},
      el("th", { scope: "col" }, "Time"),
      el("th", { scope: "col" }, "Event"),
      el("th", { scope: "col" }, "Producer"),
      ...data.lanes.map((lane) => el("th", { scope: "col" }, lane)),
      el("th", { scope: "col" }, "Trace")));
    const body = $("timeline-body");
    body.replaceChildren();
    for (const event of data.events) {
      const dead = event.consumers.some((h) => h.status === "dead_lettered");
      const bar = el("div", { className: "bar", "aria-hidden": "true" }, el("span"));
      bar.firstChild.style.left = `${((event.offset_ms || 0) / span) * 100}%`;
      const hops = new Map(event.consumers.map((h) => [h.service, h]));
      const cells = data.lanes.map((lane) => {
        if (lane === event.producer) return el("td", { className: "produced" }, "● published");
        return hopCell(hops.get(lane));
      });
      const trace = event.trace_url
        ? el("a", { href: event.trace_url, target: "_blank", rel: "noopener noreferrer" },
          `trace ${event.trace_id.slice(0, 8)}…`)
        : el("span", { className: "ids" }, "no trace id");
      const producer = event.recorded ? event.producer : "not in the log";
      body.append(el("tr", { className: dead ? "dead-row" : null },
        el("th", { scope: "row", className: "time" },
          `+${ms(event.offset_ms)}`, el("br"),
          el("span", { className: "ids" },
            event.event_time ? utc(event.event_time) : "first dead letter"), bar),
        el("td", { className: "event" }, el("code", {}, event.type), el("br"),
          el("span", { className: "ids" }, event.event_id), event.subject ? el("br") : null,
          event.subject ? el("span", { className: "ids" }, event.subject) : null),
        el("td", {}, producer),
        ...cells,
        el("td", {}, trace)));
    }
    const deadBody = $("dead-body");
    deadBody.replaceChildren();
    for (const letter of data.dead_letters) {
      deadBody.append(el("tr", { className: "dead" },
        el("td", { className: "time" }, `+${ms(letter.offset_ms)}`, el("br"),
          el("span", { className: "ids" }, utc(letter.at))),
        el("td", {}, `${letter.service} (${letter.queue})`),
        el("td", {}, el("code", {}, letter.message_type || "?"), el("br"),
          el("span", { className: "ids" }, letter.message_id || "")),
        el("td", {}, el("strong", {}, letter.reason)),
        el("td", {}, letter.attempts),
        el("td", {}, letter.error)));
    }
    if (!data.dead_letters.length) {
      deadBody.append(el("tr", {}, el("td", { colspan: "6" }, "None.")));
    }
    const services = new Set(data.events.filter((e) => e.recorded).map((e) => e.producer));
    $("timeline-title").textContent = `Timeline of ${data.correlation_id}`;
    $("timeline-summary").textContent =
      `${data.events.length} events across ${services.size} producers over ${ms(span)}; ` +
      `${data.dead_letters.length} dead letters.` +
      (data.truncated ? " Only the first 500 entries are drawn." : "");
    status.textContent = data.events.length ? "" : "No events with this correlation id.";
    $("timeline").hidden = data.events.length === 0;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", signIn);
    $("search-form").addEventListener("submit", search);
    $("sign-out").addEventListener("click", () => showLogin("Signed out."));
    $("api-key").focus();
  });
})();
