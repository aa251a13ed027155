// Playground: chat with the deployment, streamed, with the request's parameters (ranges from
// the API's ChatRequest schema) and an optional JSON schema for response_format. Requests go
// to the management API's playground route with the session (and CSRF token): the browser
// never holds a deployment key (platform/api_web.py says how the route calls the endpoint).
import { ApiError, csrfHeader, errorMessage } from "../api.js";
import { problem, rangeText, rulesOf } from "../schema.js";
import { clear, h } from "../ui.js";

const PARAMS = [["temperature", "Temperature"], ["max_tokens", "Max tokens"], ["top_p", "Top P"]];

// the text of each SSE event's `data:` line, as the stream arrives
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

export function playgroundTab(body, id) {
  const messages = [];
  let inFlight = null; // the AbortController of the reply streaming now, if one is
  const stop = () => inFlight?.abort();
  const transcript = h("div", { class: "transcript", id: "playground-transcript",
    "aria-live": "polite" });
  const prompt = h("textarea", { id: "playground-prompt", rows: 3,
    placeholder: "Send a message…", "aria-label": "Message" });
  const send = h("button", { type: "submit", class: "btn primary", text: "Send", id: "playground-send" });
  const reset = h("button", { type: "button", class: "btn ghost", text: "New chat",
    onclick: () => {
      stop(); // its reply belongs to the chat being left
      messages.length = 0;
      clear(transcript);
    } });
  const error = h("p", { class: "form-error", role: "alert", id: "playground-error", hidden: true });
  const params = h("div", { class: "params" });
  const inputs = {};
  const useSchema = h("input", { type: "checkbox", id: "playground-use-schema" });
  const schema = h("textarea", { id: "playground-schema", rows: 6, spellcheck: "false",
    "aria-label": "JSON schema", disabled: true });
  schema.value = JSON.stringify({ type: "object", properties: { answer: { type: "string" } },
    required: ["answer"] }, null, 2);
  useSchema.addEventListener("change", () => (schema.disabled = !useSchema.checked));
  const form = h("form", { class: "composer", novalidate: true }, prompt,
    h("div", { class: "tools" }, reset, send));
  body.append(h("div", { class: "playground" },
    h("div", { class: "chat card" }, transcript, error, form),
    h("aside", { class: "card" }, h("h3", { text: "Parameters" }), params,
      h("label", { class: "terms", for: "playground-use-schema" }, useSchema,
        " Answer with a JSON schema (response_format)"), schema)));

  let rules = {};
  rulesOf("ChatRequest").then((r) => {
    rules = r.properties;
    clear(params, PARAMS.map(([k, label]) => {
      inputs[k] = h("input", { id: `pg-${k}`, type: "number", step: "any", placeholder: "default" });
      return h("div", { class: "field" }, h("label", { for: `pg-${k}`, text: label }), inputs[k],
        h("p", { class: "hint", text: rangeText(rules[k] || {}) }));
    }));
  }).catch((err) => {  // the deployment's defaults still apply: chatting works without them
    clear(params, h("p", { class: "form-error", role: "alert",
      text: `Parameters unavailable (${err.message}); the deployment's defaults apply.` }));
  });

  // an assistant's bubble also holds its thinking (a thinking model's `delta.reasoning`),
  // shown once some arrives, open while it streams and folded when the answer begins
  function bubble(role, text) {
    const thinking = role === "assistant" ? h("details", { class: "thinking", hidden: true },
      h("summary", { text: "Thinking" }), h("div", { class: "reasoning" })) : null;
    const el = h("div", { class: `bubble ${role}`, "data-role": role }, h("div", { class: "who",
      text: role === "user" ? "You" : "Assistant" }), thinking, h("div", { class: "text", text }));
    transcript.append(el);
    transcript.scrollTop = transcript.scrollHeight;
    return el.querySelector(".text");
  }

  function requestBody() {
    const out = { messages: [...messages], stream: true };
    for (const [k] of PARAMS) {
      const raw = inputs[k]?.value.trim();
      if (!raw) continue;
      const value = Number(raw);
      const p = problem(k, rules[k] || {}, value);
      if (p) throw new Error(p);
      out[k] = value;
    }
    if (useSchema.checked) {
      let parsed;
      try {
        parsed = JSON.parse(schema.value);
      } catch (err) {
        throw new Error(`response_format: the JSON schema is not valid JSON (${err.message})`);
      }
      out.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
    }
    return out;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    error.hidden = true;
    messages.push({ role: "user", content: text });
    let payload;
    try {
      payload = requestBody();
    } catch (err) {
      messages.pop();
      error.textContent = err.message;
      error.hidden = false;
      return;
    }
    prompt.value = "";
    const asked = bubble("user", text).parentElement;
    const out = bubble("assistant", "");
    const controller = new AbortController();
    inFlight = controller;
    out.parentElement.classList.add("streaming");
    send.disabled = true;
    const thinking = out.parentElement.querySelector(".thinking");
    let answer = "";
    let reasoning = "";
    try {
      const response = await fetch(`/api/public/deployments/${id}/playground/chat/completions`, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", ...csrfHeader() },
        body: JSON.stringify(payload),
        signal: controller.signal,
      });
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        throw new ApiError(response.status, errorMessage(data, response.status), data);
      }
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
        const delta = chunk.choices?.[0]?.delta || {};
        if (delta.reasoning) {
          reasoning += delta.reasoning;
          thinking.querySelector(".reasoning").textContent = reasoning;
          thinking.hidden = false;
          thinking.open = !answer;
        }
        if (delta.content) {
          if (!answer) thinking.open = false; // the answer begins: the thinking folds
          answer += delta.content;
          out.textContent = answer;
        }
        transcript.scrollTop = transcript.scrollHeight;
      }
      messages.push({ role: "assistant", content: answer }); // the thinking is not sent back
    } catch (err) {
      if (controller.signal.aborted) return; // a new chat, or the tab left: nothing to say
      messages.pop(); // the question goes with its failed answer, from the page too
      asked.remove();
      out.parentElement.remove();
      error.textContent = err.message;
      error.hidden = false;
    } finally {
      out.parentElement?.classList.remove("streaming");
      if (inFlight === controller) inFlight = null;
      send.disabled = false;
    }
  });
  return stop; // leaving the tab ends the reply's generation
}
