// Configurations: description, tags and the endpoint timeout (the API's range, from its
// OpenAPI document), and undeploy / delete, each after a confirmation.
import { ApiError, api } from "../api.js";
import { problem, rangeText, rulesOf } from "../schema.js";
import { clear, confirmAction, h, toast } from "../ui.js";

export function configurationsTab(body, id, onDep) {
  let rendered = false;
  let shownStatus = null;
  const actions = h("div", { class: "card danger-zone" });
  onDep((dep) => {
    if (dep.status !== shownStatus) renderActions(dep);
    shownStatus = dep.status;
    if (rendered) return;
    rendered = true;
    rulesOf("DeploymentUpdate").then((rules) => renderForm(dep, rules.properties)).catch((err) => {
      rendered = false; // the next refresh of the deployment tries again
      toast(`The configuration form could not load: ${err.message}`, "error");
    });
  });

  function renderForm(dep, rules) {
    const description = h("textarea", { id: "cfg-description", rows: 3 });
    description.value = dep.description || "";
    const tags = h("input", { id: "cfg-tags", placeholder: "comma-separated" });
    tags.value = (dep.tags || []).join(", ");
    const timeout = h("input", { id: "cfg-timeout", type: "number", step: 1 });
    timeout.value = dep.timeout;
    const errors = {
      description: h("p", { class: "field-error", role: "alert", hidden: true, "data-error-for": "description" }),
      tags: h("p", { class: "field-error", role: "alert", hidden: true, "data-error-for": "tags" }),
      timeout: h("p", { class: "field-error", role: "alert", hidden: true, "data-error-for": "timeout" }),
    };
    const save = h("button", { type: "submit", class: "btn primary", text: "Save changes" });
    const form = h("form", { class: "card config-form", id: "config-form", novalidate: true },
      h("h2", { text: "Configurations" }),
      h("label", { for: "cfg-description", text: "Description" }), description,
      h("p", { class: "hint", text: rangeText(rules.description) }), errors.description,
      h("label", { for: "cfg-tags", text: "Tags" }), tags,
      h("p", { class: "hint", text: rangeText(rules.tags) }), errors.tags,
      h("label", { for: "cfg-timeout", text: "Endpoint timeout (s)" }), timeout,
      h("p", { class: "hint", "data-range-for": "timeout",
        text: `${rangeText(rules.timeout)} · ${rules.timeout.description || ""}` }),
      errors.timeout, save);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const values = {
        description: description.value,
        tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean),
        timeout: timeout.value.trim() === "" ? null : Number(timeout.value),
      };
      let bad = false;
      for (const [k, v] of Object.entries(values)) {
        const message = problem(k, { ...rules[k], required: k === "timeout" }, v);
        errors[k].textContent = message || "";
        errors[k].hidden = !message;
        bad ||= Boolean(message);
      }
      if (bad) return;
      save.disabled = true;
      try {
        await api.patch(`/deployments/${id}`, values);
        toast("Configuration saved");
      } catch (err) {
        const field = err instanceof ApiError ? err.body?.error?.param : null;
        const slot = errors[(field || "").split(".")[0]] || errors.description;
        slot.textContent = err.message;
        slot.hidden = false;
      } finally {
        save.disabled = false;
      }
    });
    body.prepend(form);
  }

  function renderActions(dep) {
    const undeploy = h("button", { type: "button", class: "btn", id: "undeploy",
      text: "Undeploy", disabled: !dep.actions?.undeploy,
      onclick: () => confirmAction({
        title: `Undeploy ${dep.name}?`,
        message: "Its endpoint stops answering and its replicas are released. The deployment, "
          + "its keys and its history stay: Re-trigger or Redeploy brings it back.",
        confirmLabel: "Undeploy",
        action: () => api.post(`/deployments/${id}/undeploy`),
      }).then((done) => done && toast(`${dep.name}: undeploying`)) });
    const remove = h("button", { type: "button", class: "btn danger", id: "delete-deployment",
      text: "Delete deployment", disabled: !dep.actions?.delete,
      onclick: () => confirmAction({
        title: `Delete ${dep.name}?`,
        message: "The deployment, its API keys and its history are removed for good.",
        confirmLabel: "Delete deployment",
        action: () => api.del(`/deployments/${id}`),
      }).then((done) => {
        if (!done) return;
        toast(`${dep.name} deleted`);
        location.hash = `#/models/${encodeURIComponent(dep.modelId)}`;
      }) });
    clear(actions, h("h2", { text: "Undeploy or delete" }),
      h("p", { class: "muted", text: `Status: ${dep.status}. A deployed deployment is `
        + "undeployed before it can be deleted." }),
      h("div", { class: "tools" }, undeploy, remove));
  }
  body.append(actions);
}
