// Small DOM helpers: elements without innerHTML (no markup injection), dialogs, menus, copy.
import { ApiError } from "./api.js";

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function fmtDate(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  return `${m} min ${Math.round(seconds - m * 60)} s`;
}

const STATUS_CLASS = {
  DEPLOYED: "ok",
  READY: "ok",
  SUCCESS: "ok",
  FAILED: "bad",
  IMPORT_FAILED: "bad",
  UNDEPLOYED: "idle",
  READY_TO_DEPLOY: "idle",
};

export const STATUS_LABEL = {
  READY_TO_DEPLOY: "Ready to Deploy",
  OPTIMIZING: "Optimizing",
  DEPLOYING: "Deploying",
  DEPLOYED: "Deployed",
  FAILED: "Failed",
  UNDEPLOYED: "Undeployed",
  UNDEPLOYING: "Undeploying",
  IMPORTING: "Importing",
  VALIDATING: "Validating",
  READY: "Ready to Deploy",
  IMPORT_FAILED: "Import Failed",
  SUCCESS: "Success",
};

export function badge(status, label, title) {
  return h("span", {
    class: `badge ${STATUS_CLASS[status] || "busy"}`,
    text: label || STATUS_LABEL[status] || status,
    title,
    "data-status": status,
  });
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const el = h("div", { class: `toast ${kind}`, role: "status", text: message });
  box.append(el);
  setTimeout(() => el.remove(), 4000);
}

// Copies `text`; true when it was copied.
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // not a secure context (plain http on a remote host): the old way, in the open dialog if
    // there is one (a modal dialog makes the rest of the page inert: nothing there is selected)
    const area = h("textarea", { class: "offscreen", "aria-hidden": "true" });
    area.value = text;
    (document.querySelector("dialog[open]") || document.body).append(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
    area.remove();
    return copied;
  }
}

export function copyButton(getText, label = "Copy") {
  const button = h("button", { type: "button", class: "btn small" , text: label});
  button.addEventListener("click", async () => {
    const copied = await copyText(typeof getText === "function" ? getText() : getText);
    button.textContent = copied ? "Copied" : "Copy failed: select and copy by hand";
    setTimeout(() => (button.textContent = label), copied ? 1500 : 4000);
  });
  return button;
}

// A modal dialog; resolves when it closes. `body` is an element or text.
export function dialog({ title, body, actions = [], dismissable = true, className = "" }) {
  const d = h("dialog", { class: `modal ${className}`, "aria-label": title });
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  const footer = h("div", { class: "actions" });
  d.append(h("h2", { text: title }), h("div", { class: "modal-body" }, body), error, footer);
  const done = new Promise((resolve) => d.addEventListener("close", () => resolve(d.returnValue)));
  d.addEventListener("close", () => setTimeout(() => d.remove(), 0));
  if (!dismissable) d.addEventListener("cancel", (e) => e.preventDefault());
  d.showError = (message) => {
    error.textContent = message;
    error.hidden = !message;
  };
  for (const a of actions) footer.append(a(d));
  document.body.append(d);
  d.showModal();
  d.done = done;
  return d;
}

// "Are you sure?" then `action()`; an error from it is shown in the dialog, which stays open.
export function confirmAction({ title, message, confirmLabel = "Delete", danger = true, action }) {
  return new Promise((resolve) => {
    const d = dialog({
      title,
      body: h("p", { text: message }),
      actions: [
        (dlg) => h("button", {
          type: "button", class: "btn ghost", text: "Cancel",
          onclick: () => dlg.close("cancel"),
        }),
        (dlg) => {
          const btn = h("button", {
            type: "button", class: `btn ${danger ? "danger" : "primary"}`, text: confirmLabel,
          });
          btn.addEventListener("click", async () => {
            btn.disabled = true;
            dlg.showError("");
            try {
              const result = await action();
              dlg.close("ok");
              resolve(result ?? true);
            } catch (err) {
              dlg.showError(err.message || String(err));
              btn.disabled = false;
            }
          });
          return btn;
        },
      ],
    });
    d.done.then((value) => value !== "ok" && resolve(false));
  });
}

// A three-dot menu: items [{label, onSelect, danger, disabled}]
export function kebab(label, items) {
  const wrap = h("div", { class: "menu" });
  const pop = h("div", { class: "menu-pop", role: "menu", hidden: true });
  const button = h("button", {
    type: "button", class: "kebab", "aria-label": label, "aria-haspopup": "menu",
    "aria-expanded": "false", text: "⋮",
  });
  // an open menu holds the list's refresh (anyMenuOpen): it closes on a click or focus
  // elsewhere, and on Escape (focus back on its button)
  const close = () => {
    pop.hidden = true;
    button.setAttribute("aria-expanded", "false");
    document.removeEventListener("click", outside, true);
  };
  const outside = (e) => {
    if (!wrap.contains(e.target)) close();
  };
  button.addEventListener("click", () => {
    if (!pop.hidden) return close();
    pop.hidden = false;
    button.setAttribute("aria-expanded", "true");
    document.addEventListener("click", outside, true);
    pop.querySelector("button:not([disabled])")?.focus();
  });
  wrap.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !pop.hidden) {
      e.preventDefault();
      close();
      button.focus();
    }
  });
  wrap.addEventListener("focusout", (e) => {
    if (!pop.hidden && e.relatedTarget && !wrap.contains(e.relatedTarget)) close();
  });
  for (const item of items) {
    pop.append(h("button", {
      type: "button", role: "menuitem", class: item.danger ? "danger" : "",
      text: item.label, disabled: item.disabled,
      onclick: () => {
        close();
        item.onSelect();
      },
    }));
  }
  wrap.append(button, pop);
  return wrap;
}

export function anyMenuOpen() {
  return Boolean(document.querySelector(".menu-pop:not([hidden]), dialog[open]"));
}

// Calls fn now and every `ms` until stop(); a failing call is passed to `onError` and retried
// on the next tick, unless onError returns true.
export function poll(fn, ms, onError = (err) => console.warn(err)) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try {
      await fn();
    } catch (err) {
      if (!stopped && onError(err) === true) stopped = true;
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// poll(refresh, ms) for a list: a refresh that fails says so in a line put before `anchor`,
// hidden again after one that works (a list that could not be read must not look empty or
// current).
export function pollList(anchor, refresh, ms) {
  const line = h("p", { class: "form-error refresh-error", role: "alert", hidden: true });
  anchor.before(line);
  const refreshed = async () => {
    await refresh();
    line.hidden = true;
  };
  return poll(refreshed, ms, (err) => {
    line.textContent = `Could not refresh: ${err.message || err}`;
    line.hidden = false;
    return false;
  });
}

export function table(columns, className = "") {
  const tbody = h("tbody");
  const el = h("table", { class: `grid ${className}` },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", text: c })))),
    tbody);
  return { el, tbody };
}

// The onError of a page's poll (see poll): a 404 (the page's model or deployment is gone, or
// never was) calls gone(err) and stops polling; another error shows in `line` (a .form-error,
// which the page hides again after a refresh that worked) and polling goes on.
export function pageErrors(line, gone) {
  return (err) => {
    if (err instanceof ApiError && err.status === 404) {
      gone(err);
      return true;
    }
    line.textContent = err.message || String(err);
    line.hidden = false;
    return false;
  };
}

// What a page for a missing model or deployment shows instead of itself.
export function notFound(message, href, linkText) {
  return h("div", { class: "card not-found", id: "not-found", role: "alert" },
    h("h1", { text: "Not found" }), h("p", { text: message }),
    h("a", { class: "btn", href, text: linkText }));
}
