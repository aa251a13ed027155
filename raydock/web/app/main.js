// The dashboard's shell: the session (sign in / out) and the hash router.
import { ApiError, api, request, setCsrf, whenSignedOut } from "./api.js";
import { clear, h, toast } from "./ui.js";
import { modelsPage } from "./pages/models.js";
import { modelPage } from "./pages/model.js";
import { deploymentPage } from "./pages/deployment.js";
import { wizardPage } from "./pages/wizard.js";

const main = document.getElementById("main");
let user = null;
let dispose = () => {};

const ROUTES = [
  [/^#\/models\/?$/, () => modelsPage],
  [/^#\/models\/([^/]+)$/, (m) => (el) => modelPage(el, decodeURIComponent(m[1]))],
  [/^#\/models\/([^/]+)\/deploy$/,
    (m) => (el) => wizardPage(el, { modelId: decodeURIComponent(m[1]) })],
  [/^#\/deployments\/([^/]+)\/redeploy$/,
    (m) => (el) => wizardPage(el, { deploymentId: decodeURIComponent(m[1]) })],
  [/^#\/deployments\/([^/]+)(?:\/([a-z]+))?$/,
    (m) => (el) => deploymentPage(el, decodeURIComponent(m[1]), m[2] || "endpoint")],
];

function showShell(signedIn) {
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("who").hidden = !signedIn;
  document.getElementById("user-name").textContent = signedIn ? user.name : "";
}

function route() {
  dispose();
  dispose = () => {};
  if (!user) return signInForm();
  const hash = location.hash || "#/models";
  for (const [pattern, page] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      document.querySelectorAll("[data-nav]").forEach((a) =>
        a.classList.toggle("active", hash.startsWith(`#/${a.dataset.nav}`)));
      clear(main);
      dispose = page(match)(main) || (() => {});
      return;
    }
  }
  location.hash = "#/models";
}

function signedIn(session) {
  user = session.user;
  setCsrf(session.csrfToken);
  showShell(true);
  route();
}

function signInForm(reason) {
  user = null;
  setCsrf(null);
  showShell(false);
  const input = h("input", {
    id: "api-key", name: "apiKey", type: "password", autocomplete: "off", required: true,
    placeholder: "rdm-…", spellcheck: "false",
  });
  const error = h("p", { id: "sign-in-error", class: "form-error", role: "alert",
    hidden: !reason, text: reason || "" });
  const button = h("button", { type: "submit", class: "btn primary", text: "Sign in" });
  const form = h("form", { class: "card sign-in", id: "sign-in" },
    h("h1", { text: "Sign in to raydock" }),
    h("p", { class: "muted",
      text: "Paste a management key: the admin key `raydock up` printed on first start, or one "
        + "an admin created for you. The key is sent once; the browser keeps a session." }),
    h("label", { for: "api-key", text: "Management key" }), input, error, button);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    button.disabled = true;
    error.hidden = true;
    try {
      const session = await request("POST", "/session", { apiKey: input.value });
      input.value = "";
      signedIn(session);
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401
        ? "That key was not accepted: " + err.message
        : err.message;
      error.hidden = false;
      button.disabled = false;
      input.focus();
    }
  });
  clear(main, form);
  input.focus();
}

// Signed out only when the server ended the session: otherwise its cookie would sign this
// browser in again on the next load (a shared machine).
async function signOut() {
  try {
    await api.del("/session");
  } catch (err) {
    toast(`Sign-out failed: ${err.message}`, "error");
    return;
  }
  dispose();
  dispose = () => {};
  signInForm();
}

whenSignedOut((message) => {
  if (user) {
    dispose();
    dispose = () => {};
    signInForm(message);
  }
});
document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);

(async () => {
  try {
    const session = await api.get("/session");
    if (session.signedIn) return signedIn(session);
  } catch (err) {
    console.warn(err);
  }
  signInForm();
})();
