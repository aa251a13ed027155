// A deployment's page: live status, and the seed's tabs (Model Endpoint, API keys,
// Configurations, Deployment history) plus Playground and Metrics.
import { api } from "../api.js";
import { rulesOf } from "../schema.js";
import {
  badge, clear, confirmAction, copyButton, copyText, dialog, fmtDate, h, notFound, pageErrors, poll,
  pollList, table, toast,
} from "../ui.js";
import { configurationsTab } from "./configurations.js";
import { historyTab } from "./history.js";
import { metricsTab } from "./metrics.js";
import { POLL_MS } from "./models.js";
import { playgroundTab } from "./playground.js";
import { snippets } from "./snippets.js";

const TABS = [
  ["endpoint", "Model Endpoint"],
  ["keys", "API keys"],
  ["configurations", "Configurations"],
  ["history", "Deployment history"],
  ["playground", "Playground"],
  ["metrics", "Metrics"],
];

export function deploymentPage(main, deploymentId, tab) {
  const id = encodeURIComponent(deploymentId);
  const head = h("div", { class: "dep-head" });
  const problem = h("p", { class: "form-error", role: "alert", id: "page-error", hidden: true });
  const body = h("section", { class: "tab-body", id: `tab-${tab}` });
  main.append(
    h("nav", { class: "crumbs" }, h("a", { href: "#/models", text: "Open-Source Models" }), " / ",
      h("a", { id: "crumb-model", href: "#/models" }), " / ", h("span", { id: "crumb-dep" })),
    problem,
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
    problem.hidden = true;
    const r = dep.replicas || {};
    clear(head,
      h("div", { class: "page-head" },
        h("h1", {}, dep.name, " ", badge(dep.status, undefined, dep.failureReason || undefined)),
        h("a", { class: "btn", id: "redeploy", href: `#/deployments/${id}/redeploy`,
          text: "Redeploy" })),
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
  const stops = [];
  const stopAll = () => stops.forEach((s) => s());
  // deleted (here, elsewhere, or never made): the page says so instead of its stale tabs
  const gone = () => {
    stopAll();
    const [href, back] = dep ? [`#/models/${encodeURIComponent(dep.modelId)}`,
      "Back to the model's deployments"] : ["#/models", "Back to Open-Source Models"];
    clear(main, notFound(`There is no deployment ${deploymentId}: it was deleted or never `
      + "existed.", href, back));
  };
  stops.push(poll(refreshHead, POLL_MS, pageErrors(problem, gone)));
  const onDep = (fn) => listeners.push(fn);
  const render = { endpoint: endpointTab, keys: keysTab, configurations: configurationsTab,
    history: historyTab, playground: playgroundTab, metrics: metricsTab };
  const stop = (render[tab] || endpointTab)(body, id, onDep);
  if (stop) stops.push(stop);
  return stopAll;
}

// ------------------------------------------------------------------ Model Endpoint

function endpointTab(body, id, onDep) {
  let rendered = false;
  onDep((dep) => {
    if (rendered) return;
    rendered = true;
    const url = location.origin + dep.endpoint;
    clear(body,
      h("p", {}, "Call the deployment with one of its API keys (",
        h("a", { href: `#/deployments/${id}/keys`, text: "create one" }),
        "); the samples read it from the environment variable RAYDOCK_KEY."),
      h("div", { class: "snippet" },
        h("div", { class: "snippet-head" }, h("strong", { text: "Endpoint" }), copyButton(url)),
        h("pre", { id: "endpoint-url" }, h("code", { text: url }))),
      snippets(location.origin, dep));
  });
}

// ------------------------------------------------------------------ API keys

async function keyLimitRanges() {
  // the ranges the API checks, from its own OpenAPI document
  try {
    const rules = await rulesOf("KeyLimits");
    return Object.fromEntries(Object.entries(rules.properties)
      .map(([k, r]) => [k, { min: r.minimum, max: r.maximum }]));
  } catch {
    return {};
  }
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
    // the secret is shown once: the dialog closes only by a button (Esc would lose it), and
    // stays open when the copy failed
    dialog({
      title: "API key created",
      className: "key-once",
      dismissable: false,
      body: h("div", {},
        h("p", { text: `Copy the key "${created.name}" now: raydock keeps only its hash and `
          + "will not show it again." }),
        h("pre", {}, code)),
      actions: [
        (d) => h("button", { type: "button", class: "btn ghost", text: "I have copied it",
          onclick: () => d.close("ok") }),
        (d) => h("button", { type: "button", class: "btn primary", text: "Copy and close",
          onclick: async () => {
            if (!(await copyText(created.apiKey))) {
              d.showError("Copy failed: select the key above and copy it by hand.");
              return;
            }
            toast("Key copied");
            d.close("ok");
          } }),
      ],
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
  return pollList(el, refresh, POLL_MS);
}
