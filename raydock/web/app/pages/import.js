// The Import model dialog: Base / Adapter tabs, drag-and-drop or browse, the extension checked
// before upload, and a chunked upload (the files/session API) with a progress bar.
import { api, listPages } from "../api.js";
import { clear, dialog, h, toast } from "../ui.js";

const CHUNK_BYTES = 8 * 2 ** 20;

const INSTRUCTIONS = {
  base: ["A .zip in Hugging Face layout:", "config.json", "a tokenizer: tokenizer.json, tokenizer.model, or vocab.json + merges.txt", "*.safetensors weights (pickle-only weights are refused)",
    "optional: chat template, generation_config.json, deployconfig.json"],
  adapter: ["A .zip with a PEFT LoRA adapter:", "adapter_config.json",
    "adapter_model.safetensors", "the base model must be Ready to Deploy"],
};

export function zipProblem(file) {
  if (!file) return "Choose a file.";
  if (!/\.zip$/i.test(file.name) || file.name.length <= 4) {
    return `Only .zip archives can be imported: "${file.name}" is not one.`;
  }
  if (file.size === 0) return `"${file.name}" is empty.`;
  return null;
}

function putChunk(url, blob, csrf, onProgress, signal) {
  // XMLHttpRequest: fetch has no upload progress
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    signal.addEventListener("abort", () => xhr.abort(), { once: true });
    xhr.onabort = () => reject(new DOMException("the upload was cancelled", "AbortError"));
    xhr.open("PUT", url);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => {
      if (xhr.status < 300) return resolve();
      let message = `HTTP ${xhr.status}`;
      try {
        message = JSON.parse(xhr.responseText).error.message;
      } catch { /* not JSON */ }
      reject(new Error(message));
    };
    xhr.onerror = () => reject(new Error("the upload was interrupted"));
    xhr.send(blob);
  });
}

// `signal` (an AbortController's) cancels the upload: the server deletes what it received;
// `maxChunkBytes`: the server's limit on one chunk (the session says it)
export async function uploadZip(file, options, onProgress, csrf, signal, maxChunkBytes) {
  const chunkBytes = Math.min(CHUNK_BYTES, maxChunkBytes || CHUNK_BYTES);
  const totalChunks = Math.max(1, Math.ceil(file.size / chunkBytes));
  const session = await api.post("/files/session/start", {
    fileName: file.name, totalSize: file.size, totalChunks, ...options,
  });
  const path = `/files/session/${session.sessionId}`;
  let sent = 0;
  try {
    for (let n = 1; n <= totalChunks; n++) {
      signal.throwIfAborted();
      const blob = file.slice((n - 1) * chunkBytes, n * chunkBytes);
      await putChunk(`/api/public${path}/chunks/${n}`, blob, csrf,
        (loaded) => onProgress((sent + loaded) / file.size), signal);
      sent += blob.size;
      onProgress(sent / file.size);
    }
    signal.throwIfAborted();
  } catch (err) {
    // cancelled, or a chunk failed: nothing of it should stay on the server's disk
    await api.del(path).catch(() => {});
    throw err;
  }
  return api.post(`${path}/complete`);
}

export async function importDialog(onImported) {
  const session = await api.get("/session");
  let kind = "base";
  let file = null;
  const fileInput = h("input", { type: "file", id: "import-file", accept: ".zip", class: "offscreen" });
  const chosen = h("p", { class: "chosen", id: "import-chosen", text: "No file chosen" });
  const drop = h("div", { class: "drop", id: "import-drop", tabindex: 0 },
    h("p", { text: "Drag and drop a .zip here, or " },
      h("button", { type: "button", class: "link", text: "browse",
        onclick: () => fileInput.click() })), chosen, fileInput);
  const base = h("select", { id: "import-base" });
  const baseRow = h("div", { hidden: true }, h("label", { for: "import-base", text: "Base model" }), base);
  const description = h("input", { id: "import-description", maxlength: 2000 });
  const tags = h("input", { id: "import-tags", placeholder: "comma-separated" });
  const instructions = h("ul", { class: "instructions" });
  const bar = h("div", { class: "bar-fill" });
  const progress = h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0,
    "aria-valuemax": 100, "aria-valuenow": 0, hidden: true, id: "import-progress" }, bar,
    h("span", { class: "bar-label", text: "0 %" }));
  const tabs = h("div", { class: "tabs", role: "tablist" });

  function setKind(next) {
    kind = next;
    clear(tabs, [["base", "Base Model"], ["adapter", "Adapter Model"]].map(([k, label]) =>
      h("button", { type: "button", role: "tab", class: k === kind ? "active" : "",
        "aria-selected": String(k === kind), text: label, onclick: () => setKind(k) })));
    baseRow.hidden = kind !== "adapter";
    const [head, ...items] = INSTRUCTIONS[kind];
    clear(instructions, h("li", { class: "head", text: head }), items.map((t) => h("li", { text: t })));
  }
  setKind("base");
  // an adapter is checked against its base's weights: the base comes first
  listPages("/models", "models", { id: "modelId" }).then(({ rows: models }) => {
    const bases = models.filter((m) => m.kind === "base" && m.status === "READY");
    clear(base, h("option", { value: "", text: bases.length ? "Choose the base model…"
      : "No base model is Ready to Deploy" }),
    bases.map((m) => h("option", { value: m.modelId, text: m.name })));
  });

  const d = dialog({
    title: "Import model",
    className: "import",
    body: h("div", { class: "import-grid" },
      h("div", {}, tabs, baseRow, drop,
        h("label", { for: "import-description", text: "Description (optional)" }), description,
        h("label", { for: "import-tags", text: "Tags (optional)" }), tags, progress),
      h("aside", { class: "card" }, h("h3", { text: "Instructions" }), instructions)),
    actions: [
      (dlg) => h("button", { type: "button", class: "btn ghost", text: "Cancel",
        onclick: () => dlg.close("cancel") }),
      (dlg) => h("button", { type: "button", class: "btn primary", id: "import-submit",
        text: "Import", onclick: (e) => start(dlg, e.target) }),
    ],
  });

  // Cancel (or Esc) during an upload stops it
  const upload = new AbortController();
  d.addEventListener("close", () => upload.abort());

  function choose(f) {
    file = f;
    chosen.textContent = f ? `${f.name} (${(f.size / 2 ** 20).toFixed(1)} MiB)` : "No file chosen";
    d.showError(f ? zipProblem(f) || "" : "");
  }
  fileInput.addEventListener("change", () => choose(fileInput.files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });

  async function start(dlg, button) {
    const problem = zipProblem(file);
    if (problem) return dlg.showError(problem);
    if (kind === "adapter" && !base.value) return dlg.showError("Pick the base model first.");
    dlg.showError("");
    button.disabled = true;
    progress.hidden = false;
    const show = (fraction) => {
      const pct = Math.min(100, Math.round(fraction * 100));
      bar.style.width = `${pct}%`;
      progress.setAttribute("aria-valuenow", pct);
      progress.querySelector(".bar-label").textContent = `${pct} %`;
    };
    try {
      const options = { kind, description: description.value.trim(),
        tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean) };
      if (kind === "adapter") options.baseModelId = base.value;
      const ref = await uploadZip(
        file, options, show, session.csrfToken, upload.signal, session.maxChunkBytes);
      show(1);
      toast(`${file.name}: uploaded, importing`);
      dlg.close("ok");
      onImported(ref);
    } catch (err) {
      if (err.name === "AbortError") return toast(`${file.name}: upload cancelled`);
      dlg.showError(err.message);
      button.disabled = false;
    }
  }
}
