// Open-Source Models: the seed's list, with search, live counts and a three-dot menu.
import { api, listPages } from "../api.js";
import {
  anyMenuOpen, badge, clear, confirmAction, h, kebab, pollList, table, toast,
} from "../ui.js";
import { importDialog } from "./import.js";

export const POLL_MS = 3000;

export function modelsPage(main) {
  let models = [];
  let shown = "";
  let pages = 1; // pages of the list shown (newest first); "Show more" adds one
  let total = 0;
  const search = h("input", {
    type: "search", id: "model-search", placeholder: "Search models", "aria-label": "Search models",
  });
  const { el, tbody } = table(
    ["Model Name", "Active Deployments", "Deployment Failed", "Ready to Deploy", "Source", ""],
    "models");
  const empty = h("p", { class: "muted empty", hidden: true });
  const more = h("button", { type: "button", class: "btn", id: "models-more", hidden: true,
    onclick: () => {
      pages += 1;
      refresh();
    } });
  const importButton = h("button", { type: "button", class: "btn primary", text: "Import model",
    onclick: () => importDialog(refresh) });
  main.append(
    h("div", { class: "page-head" }, h("h1", { text: "Open-Source Models" }),
      h("div", { class: "tools" }, search, importButton)),
    el, empty, h("div", { class: "list-more" }, more));

  function render(force = false) {
    const q = search.value.trim().toLowerCase();
    const rows = models.filter((m) => !q || m.name.toLowerCase().includes(q)
      || (m.tags || []).some((t) => t.toLowerCase().includes(q)));
    const signature = JSON.stringify([q, rows, total]);
    if (!force && (signature === shown || anyMenuOpen())) return;
    shown = signature;
    clear(tbody, rows.map(row));
    empty.hidden = rows.length > 0;
    empty.textContent = !models.length ? "No models yet: import one."
      : models.length < total ? `No model among the ${models.length} shown matches your search.`
        : "No model matches your search.";
    more.hidden = models.length >= total;
    more.textContent = `Show more (${models.length} of ${total} shown)`;
  }

  function row(m) {
    const name = h("td", { class: "name" },
      h("a", { href: `#/models/${encodeURIComponent(m.modelId)}`, text: m.name }));
    name.append(" ", badge(m.status, m.statusLabel, m.error || undefined));
    if (m.kind === "adapter") name.append(" ", h("span", { class: "tag", text: "adapter" }));
    if (m.status === "IMPORT_FAILED" && m.error) {
      name.append(h("div", { class: "error-detail", text: m.error }));
    }
    return h("tr", { dataset: { modelId: m.modelId } },
      name,
      h("td", { class: "num", "data-col": "active", text: m.activeDeployments }),
      h("td", { class: "num", "data-col": "failed", text: m.deploymentFailed }),
      h("td", { class: "num", "data-col": "ready", text: m.readyToDeploy }),
      h("td", { "data-col": "source", text: m.sourceLabel }),
      h("td", { class: "row-menu" }, kebab(`Actions for ${m.name}`, menu(m))));
  }

  function menu(m) {
    const id = encodeURIComponent(m.modelId);
    const items = [
      { label: "View deployments", onSelect: () => (location.hash = `#/models/${id}`) },
    ];
    if (m.status === "READY") {
      items.push({ label: "Deploy", onSelect: () => (location.hash = `#/models/${id}/deploy`) });
    }
    if (m.status === "IMPORT_FAILED") {
      // a download resumes (the API refuses an upload, with the reason: upload it again)
      items.push({ label: "Retry import", onSelect: async () => {
        try {
          await api.post(`/models/${id}/retry-import`);
          toast(`${m.name}: importing again`);
          refresh();
        } catch (err) {
          toast(err.message, "error");
        }
      } });
      items.push({ label: "Re-import a file…", onSelect: () => importDialog(refresh) });
    }
    items.push({ label: m.status === "IMPORT_FAILED" ? "Delete (discard the import)" : "Delete",
      danger: true, onSelect: () => remove(m) });
    return items;
  }

  async function remove(m) {
    const done = await confirmAction({
      title: `Delete ${m.name}?`,
      message: "The model, its files and its deployments' records are removed. "
        + "A model with active deployments cannot be deleted: undeploy them first.",
      confirmLabel: "Delete model",
      action: () => api.del(`/models/${encodeURIComponent(m.modelId)}`),
    });
    if (done) {
      toast(`${m.name} deleted`);
      refresh();
    }
  }

  async function refresh() {
    ({ rows: models, total } = await listPages("/models", "models", { pages, id: "modelId" }));
    render();
  }

  search.addEventListener("input", () => render(true));
  return pollList(el, refresh, POLL_MS);
}
