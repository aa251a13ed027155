// A model's Deployments page: the seed's columns and actions, live.
import { api } from "../api.js";
import {
  anyMenuOpen, badge, clear, copyText, fmtDate, h, kebab, notFound, pageErrors, poll, table, toast,
} from "../ui.js";
import { POLL_MS } from "./models.js";

// one line that runs as pasted, with the key in $RAYDOCK_KEY (double quotes: the shell fills
// it in)
export function curlFor(dep) {
  const url = `${location.origin}/deployments/${dep.deploymentId}/v2/chat/completions`;
  return `curl ${url} -H "Authorization: Bearer $RAYDOCK_KEY" -H 'Content-Type: application/json' `
    + `-d '{"messages": [{"role": "user", "content": "Hello"}]}'`;
}

export function modelPage(main, modelId) {
  const id = encodeURIComponent(modelId);
  const title = h("h1", { text: "Deployments" });
  const info = h("p", { class: "muted" });
  const { el, tbody } = table(
    ["Deployment Name", "ID", "Status", "Tags", "Added By", "Added On", ""], "deployments");
  const empty = h("p", { class: "muted empty", hidden: true, text: "No deployments of this model yet." });
  const problem = h("p", { class: "form-error", role: "alert", id: "page-error", hidden: true });
  main.append(
    h("nav", { class: "crumbs" }, h("a", { href: "#/models", text: "Open-Source Models" }), " / ",
      h("span", { id: "crumb-model" })),
    problem,
    h("div", { class: "page-head" }, title,
      // shown once the model is known to be Ready to Deploy
      h("a", { class: "btn primary", id: "deploy-model", href: `#/models/${id}/deploy`,
        text: "Deploy", hidden: true })), info, el, empty);
  let shown = "";

  function row(d) {
    const actions = [
      { label: "Copy cURL", onSelect: async () => {
        if (await copyText(curlFor(d))) toast("cURL copied");
        else toast("Copy failed: the browser refused the clipboard", "error");
      } },
      { label: "Manage API Keys",
        onSelect: () => (location.hash = `#/deployments/${d.deploymentId}/keys`) },
    ];
    if (d.actions?.retrigger) {
      actions.push({ label: "Re-trigger", onSelect: async () => {
        try {
          await api.post(`/deployments/${d.deploymentId}/retrigger`);
          toast(`${d.name}: re-triggered`);
          refresh();
        } catch (err) {
          toast(err.message, "error");
        }
      } });
    }
    return h("tr", { dataset: { deploymentId: d.deploymentId } },
      h("td", { class: "name" }, h("a", { href: `#/deployments/${d.deploymentId}`, text: d.name })),
      h("td", { class: "mono", text: d.deploymentId }),
      h("td", {}, badge(d.status, undefined, d.failureReason || undefined)),
      h("td", {}, (d.tags || []).map((t) => h("span", { class: "tag", text: t }))),
      h("td", { text: d.addedBy || "—" }),
      h("td", { text: fmtDate(d.addedOn) }),
      h("td", { class: "row-menu" }, kebab(`Actions for ${d.name}`, actions)));
  }

  async function refresh() {
    const [model, deps] = await Promise.all([
      api.get(`/models/${id}`), api.get(`/models/${id}/deployments`),
    ]);
    problem.hidden = true;
    title.textContent = `Deployments of ${model.name}`;
    // only a Ready-to-Deploy model deploys (the API answers 409 otherwise)
    document.getElementById("deploy-model").hidden = model.status !== "READY";
    document.getElementById("crumb-model").textContent = model.name;
    info.textContent = `${model.sourceLabel} · ${model.statusLabel} · imported ${fmtDate(model.createdAt)}`
      + (model.error ? ` · ${model.error}` : "");
    const signature = JSON.stringify(deps.deployments);
    if (signature === shown || anyMenuOpen()) return;
    shown = signature;
    clear(tbody, deps.deployments.map(row));
    empty.hidden = deps.deployments.length > 0;
  }

  // deleted (here, elsewhere, or never made): the page says so instead of a stale one
  const gone = () => clear(main, notFound(`There is no model ${modelId}: it was deleted or never `
    + "existed.", "#/models", "Back to Open-Source Models"));
  return poll(refresh, POLL_MS, pageErrors(problem, gone));
}
