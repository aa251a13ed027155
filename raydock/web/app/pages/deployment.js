// A deployment's page: live status, and the tabs Model Endpoint, API keys, history, Metrics.
import { api, request } from "../api.js";
import { fmtNumber, lineChart } from "../chart.js";
import { bucketDelta, buckets, parseMetrics, total, quantile } from "../prom.js";
import {
  badge, clear, confirmAction, copyButton, copyText, dialog, fmtDate, fmtDuration, h, poll, table,
  toast,
} from "../ui.js";
import { POLL_MS } from "./models.js";

const TABS = [
  ["endpoint", "Model Endpoint"],
  ["keys", "API keys"],
  ["history", "Deployment history"],
  ["metrics", "Metrics"],
];

export function deploymentPage(main, deploymentId, tab) {
  const id = encodeURIComponent(deploymentId);
  const head = h("div", { class: "dep-head" });
  const body = h("section", { class: "tab-body", id: `tab-${tab}` });
  main.append(
    h("nav", { class: "crumbs" }, h("a", { href: "#/models", text: "Open-Source Models" }), " / ",
      h("a", { id: "crumb-model", href: "#/models" }), " / ", h("span", { id: "crumb-dep" })),
    head,
    h("div", { class: "tabs", role: "tablist" }, TABS.map(([key, label]) => h("a", {
      role: "tab", href: `#/deployments/${id}/${key}`, text: label,
      class: key === tab ? "active" : "", "aria-selected": String(key === tab),
    }))),
    body);

  let dep = null;
  const listeners = [];
  async function refreshHead() {
    dep = await api.get(`/deployments/${id}`);
    const r = dep.replicas || {};
    clear(head,
      h("h1", {}, dep.name, " ", badge(dep.status, undefined, dep.failureReason || undefined)),
      h("p", { class: "muted" }, h("span", { class: "mono", text: dep.deploymentId }),
        ` · replicas ${r.current ?? 0} running, target ${r.target ?? 0} (min ${r.min ?? "—"}, `
        + `max ${r.max ?? "—"}) · timeout ${dep.timeout} s · added by ${dep.addedBy || "—"} `
        + `on ${fmtDate(dep.addedOn)}`),
      dep.failureReason ? h("p", { class: "form-error", text: dep.failureReason }) : null,
      r.message ? h("p", { class: "muted", text: r.message }) : null);
    const crumb = document.getElementById("crumb-model");
    crumb.href = `#/models/${encodeURIComponent(dep.modelId)}`;
    crumb.textContent = "Deployments";
    document.getElementById("crumb-dep").textContent = dep.name;
    for (const fn of listeners) fn(dep);
  }
  const stops = [poll(refreshHead, POLL_MS)];
  const onDep = (fn) => listeners.push(fn);
  const render = { endpoint: endpointTab, keys: keysTab, history: historyTab, metrics: metricsTab };
  const stop = (render[tab] || endpointTab)(body, id, onDep);
  if (stop) stops.push(stop);
  return () => stops.forEach((s) => s());
}

// ------------------------------------------------------------------ Model Endpoint

function snippet(label, text, idName) {
  return h("div", { class: "snippet" },
    h("div", { class: "snippet-head" }, h("strong", { text: label }), copyButton(text)),
    h("pre", { id: idName }, h("code", { text })));
}

function endpointTab(body, id, onDep) {
  let rendered = false;
  onDep((dep) => {
    if (rendered) return;
    rendered = true;
    const url = location.origin + dep.endpoint;
    const python = [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url="${location.origin}/deployments/${dep.deploymentId}/v2",`,
      '                api_key="<your deployment key>")',
      "reply = client.chat.completions.create(",
      `    model="${dep.name}",`,
      '    messages=[{"role": "user", "content": "Hello"}],',
      ")",
      "print(reply.choices[0].message.content)",
    ].join("\n");
    clear(body,
      h("p", {}, "Call the deployment with one of its API keys (",
        h("a", { href: `#/deployments/${id}/keys`, text: "create one" }), ")."),
      snippet("Endpoint", url, "endpoint-url"),
      snippet("cURL", dep.curl, "curl-sample"),
      snippet("Python (openai)", python, "python-sample"));
  });
}

// ------------------------------------------------------------------ API keys

let limitRanges = null;
async function keyLimitRanges() {
  // the ranges the API checks, from its own OpenAPI document
  if (limitRanges) return limitRanges;
  try {
    const doc = await request("GET", null, undefined, { url: "/openapi.json" });
    const props = doc.components.schemas.KeyLimits.properties;
    limitRanges = Object.fromEntries(Object.entries(props).map(([k, p]) => {
      const num = (p.anyOf || [p]).find((o) => o.type === "integer") || {};
      return [k, { min: num.minimum, max: num.maximum }];
    }));
  } catch {
    limitRanges = {};
  }
  return limitRanges;
}

const LIMITS = [
  ["requestsPerMinute", "Requests per minute"],
  ["tokensPerMinute", "Tokens per minute"],
  ["tokensPerDay", "Tokens per day"],
];

function keysTab(body, id) {
  const name = h("input", { id: "key-name", name: "name", required: true, maxlength: 200,
    placeholder: "e.g. my-app" });
  const limitInputs = Object.fromEntries(LIMITS.map(([k]) => [k, h("input", {
    id: `limit-${k}`, name: k, type: "number", step: 1, placeholder: "no limit" })]));
  keyLimitRanges().then((ranges) => {
    for (const [k, input] of Object.entries(limitInputs)) {
      if (ranges[k]?.min !== undefined) input.min = ranges[k].min;
      if (ranges[k]?.max !== undefined) input.max = ranges[k].max;
    }
  });
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  const submit = h("button", { type: "submit", class: "btn primary", text: "Create API key" });
  const form = h("form", { class: "card key-form", id: "create-key" },
    h("h2", { text: "Create a new API key" }),
    h("label", { for: "key-name", text: "Name" }), name,
    h("details", {}, h("summary", { text: "Limits (optional)" }),
      h("div", { class: "limits" }, LIMITS.map(([k, label]) => h("div", {},
        h("label", { for: `limit-${k}`, text: label }), limitInputs[k])))),
    error, submit);
  const { el, tbody } = table(["Name", "Key", "Limits", "Created By", "Created On", "Last Used", ""],
    "keys");
  const empty = h("p", { class: "muted empty", hidden: true, text: "No API keys yet." });
  body.append(form, h("h2", { text: "API keys" }), el, empty);

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.hidden = true;
    if (!form.reportValidity()) return;
    const limits = {};
    for (const [k, input] of Object.entries(limitInputs)) {
      if (input.value !== "") limits[k] = Number(input.value);
    }
    submit.disabled = true;
    try {
      const created = await api.post(`/deployments/${id}/api-keys`, {
        name: name.value.trim(), ...(Object.keys(limits).length ? { limits } : {}),
      });
      form.reset();
      showOnce(created);
      refresh();
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });

  function showOnce(created) {
    const code = h("code", { id: "new-api-key", text: created.apiKey });
    dialog({
      title: "API key created",
      className: "key-once",
      body: h("div", {},
        h("p", { text: `Copy the key "${created.name}" now: raydock keeps only its hash and `
          + "will not show it again." }),
        h("pre", {}, code)),
      actions: [(d) => h("button", { type: "button", class: "btn primary", text: "Copy and close",
        onclick: async () => {
          await copyText(created.apiKey);
          toast("Key copied");
          d.close("ok");
        } })],
    });
  }

  function row(k) {
    const limits = Object.entries(k.limits || {}).filter(([, v]) => v !== null)
      .map(([n, v]) => `${n}: ${v.toLocaleString()}`).join(", ") || "none";
    return h("tr", { dataset: { keyId: k.keyId, keyName: k.name } },
      h("td", { text: k.name }),
      h("td", { class: "mono", text: `${k.prefix}…` }),
      h("td", { text: limits }),
      h("td", { text: k.createdBy || "—" }),
      h("td", { text: fmtDate(k.createdAt) }),
      h("td", { text: fmtDate(k.lastUsedAt) }),
      h("td", {}, h("button", { type: "button", class: "btn small danger",
        "aria-label": `Delete key ${k.name}`, text: "Delete",
        onclick: () => remove(k) })));
  }

  async function remove(k) {
    const done = await confirmAction({
      title: `Delete the key ${k.name}?`,
      message: "Requests with this key are refused from now on (every replica within a second).",
      confirmLabel: "Delete key",
      action: () => api.del(`/deployments/${id}/api-keys/${encodeURIComponent(k.keyId)}`),
    });
    if (done) {
      toast(`Key ${k.name} deleted`);
      refresh();
    }
  }

  let shown = "";
  async function refresh() {
    const keys = (await api.get(`/deployments/${id}/api-keys`)).apiKeys;
    const signature = JSON.stringify(keys);
    if (signature === shown) return;
    shown = signature;
    clear(tbody, keys.map(row));
    empty.hidden = keys.length > 0;
  }
  return poll(refresh, POLL_MS);
}

// ------------------------------------------------------------------ history

function historyTab(body, id) {
  const { el, tbody } = table(
    ["Version", "Result", "Deployed By", "Started", "Ended", "Duration", "Undeployed", ""],
    "history");
  body.append(el);
  let shown = "";
  async function refresh() {
    const versions = (await api.get(`/deployments/${id}/history`)).versions;
    const signature = JSON.stringify(versions);
    if (signature === shown || document.querySelector(".history details[open]")) return;
    shown = signature;
    const latest = Math.max(...versions.map((v) => v.version));
    clear(tbody, [...versions].reverse().map((v) => {
      const u = v.undeployment;
      return h("tr", { dataset: { version: v.version } },
        h("td", {}, v.name, v.version === latest ? h("span", { class: "tag latest", text: "Latest" }) : null),
        h("td", {}, v.result ? badge(v.result, undefined, v.failureReason || undefined)
          : badge("DEPLOYING", "In progress")),
        h("td", { text: v.deployedBy || "—" }),
        h("td", { text: fmtDate(v.startedAt) }),
        h("td", { text: fmtDate(v.endedAt) }),
        h("td", { text: fmtDuration(v.durationSeconds) }),
        h("td", { text: u ? `${u.undeployedBy || "—"}, ${fmtDate(u.endedAt || u.startedAt)}` : "—" }),
        h("td", {}, h("details", {}, h("summary", { text: "Configuration" }),
          h("pre", { class: "config" }, JSON.stringify(v.config, null, 2)))));
    }));
  }
  return poll(refresh, POLL_MS);
}

// ------------------------------------------------------------------ Metrics

const SERIES = new Map(); // deploymentId -> [{t, requests, tokens, ttft}], kept across tabs
const KEEP_MS = 15 * 60 * 1000;

function metricsTab(body, id) {
  const depId = decodeURIComponent(id);
  const tiles = h("div", { class: "tiles" });
  const charts = h("div", { class: "charts" });
  const note = h("p", { class: "muted", id: "metrics-note" });
  body.append(tiles, charts, note);
  const series = SERIES.get(depId) || [];
  SERIES.set(depId, series);
  let previous = null;

  const tile = (label, value, idName) => h("div", { class: "tile" },
    h("div", { class: "tile-label", text: label }),
    h("div", { class: "tile-value", id: idName, text: value }));

  async function refresh() {
    let text;
    try {
      text = await request("GET", null, undefined, { raw: true, url: "/metrics" });
    } catch (err) {
      note.textContent = `Metrics are not available: ${err.message}`;
      return;
    }
    const samples = parseMetrics(text);
    const want = { deployment: depId };
    const now = Date.now();
    const requests = total(samples, "raydock_requests_total", want);
    const tokens = total(samples, "raydock_prompt_tokens_total", want)
      + total(samples, "raydock_completion_tokens_total", want);
    const ttftBuckets = buckets(samples, "raydock_time_to_first_token_seconds", want);
    const point = { t: now, requests, tokens, ttftBuckets, reqRate: null, tokRate: null, ttft: null };
    if (previous) {
      const dt = (now - previous.t) / 1000;
      point.reqRate = Math.max(0, requests - previous.requests) / dt;
      point.tokRate = Math.max(0, tokens - previous.tokens) / dt;
      point.ttft = quantile(0.5, bucketDelta(ttftBuckets, previous.ttftBuckets));
    }
    previous = point;
    series.push(point);
    while (series.length && series[0].t < now - KEEP_MS) series.shift();

    let stats = null;
    try {
      stats = await api.get(`/deployments/${id}/stats`);
    } catch {
      stats = null; // not DEPLOYED
    }
    const p50 = quantile(0.5, ttftBuckets);
    clear(tiles,
      tile("Requests", requests.toLocaleString(), "metric-requests"),
      tile("Tokens", tokens.toLocaleString(), "metric-tokens"),
      tile("TTFT p50", p50 === null ? "—" : `${fmtNumber(p50 * 1000, 0)} ms`, "metric-ttft"),
      tile("Running / waiting", stats ? `${stats.running ?? 0} / ${stats.waiting ?? 0}` : "—",
        "metric-running"));
    const pts = (key) => series.map((p) => ({ t: p.t, v: p[key] }));
    clear(charts,
      lineChart({ title: "Requests/s", points: pts("reqRate"), id: "chart-requests" }),
      lineChart({ title: "Tokens/s", points: pts("tokRate"), id: "chart-tokens" }),
      lineChart({ title: "TTFT p50", unit: "s", points: pts("ttft"), id: "chart-ttft" }));
    note.textContent = `From /metrics (all replicas and nodes), every ${POLL_MS / 1000} s; `
      + "TTFT p50 per interval from the histogram's buckets. Totals since the platform started.";
  }
  return poll(refresh, POLL_MS);
}
