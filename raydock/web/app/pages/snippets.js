// Copy-ready calls of a deployment: cURL, Python (openai) and JavaScript, each plain and with
// response_format (a JSON schema the answer must follow). The key comes from $RAYDOCK_KEY.
import { clear, copyButton, h } from "../ui.js";

const SCHEMA = {
  type: "json_schema",
  json_schema: {
    name: "answer",
    schema: {
      type: "object",
      properties: { answer: { type: "string" } },
      required: ["answer"],
    },
  },
};

function curl(base, dep, structured) {
  const body = { messages: [{ role: "user", content: "Hello" }] };
  if (structured) body.response_format = SCHEMA;
  return [
    `curl ${base}/deployments/${dep.deploymentId}/v2/chat/completions \\`,
    '  -H "Authorization: Bearer $RAYDOCK_KEY" \\',
    "  -H 'Content-Type: application/json' \\",
    `  -d '${JSON.stringify(body)}'`,
  ].join("\n");
}

export function python(base, dep, structured) {
  const lines = [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${base}/deployments/${dep.deploymentId}/v2",`,
    '                api_key=os.environ["RAYDOCK_KEY"])',
    "reply = client.chat.completions.create(",
    // a name may hold any character: a JSON string is a valid Python string literal
    `    model=${JSON.stringify(dep.name)},`,
    '    messages=[{"role": "user", "content": "Hello"}],',
  ];
  if (structured) {
    const fmt = JSON.stringify(SCHEMA, null, 4).replace(/\n/g, "\n    ")
      .replace(/true/g, "True").replace(/false/g, "False");
    lines.push(`    response_format=${fmt},`);
  }
  lines.push(")", "print(reply.choices[0].message.content)");
  return lines.join("\n");
}

function javascript(base, dep, structured) {
  const body = { model: dep.name, messages: [{ role: "user", content: "Hello" }] };
  if (structured) body.response_format = SCHEMA;
  return [
    `const response = await fetch("${base}/deployments/${dep.deploymentId}/v2/chat/completions", {`,
    '  method: "POST",',
    "  headers: {",
    "    Authorization: `Bearer ${process.env.RAYDOCK_KEY}`,",
    '    "Content-Type": "application/json",',
    "  },",
    `  body: JSON.stringify(${JSON.stringify(body, null, 2).replace(/\n/g, "\n  ")}),`,
    "});",
    "const reply = await response.json();",
    "console.log(reply.choices[0].message.content);",
  ].join("\n");
}

const LANGS = [["curl", "cURL", curl], ["python", "Python (openai)", python],
  ["javascript", "JavaScript", javascript]];

export function snippets(base, dep) {
  let lang = "curl";
  const tabs = h("div", { class: "tabs sub", role: "tablist", "aria-label": "Language" });
  const out = h("div", {});
  function render() {
    clear(tabs, LANGS.map(([key, label]) => h("button", {
      type: "button", role: "tab", class: key === lang ? "active" : "",
      "aria-selected": String(key === lang), text: label,
      onclick: () => {
        lang = key;
        render();
      },
    })));
    const make = LANGS.find(([key]) => key === lang)[2];
    clear(out, [false, true].map((structured) => {
      const text = make(base, dep, structured);
      const idName = `${lang}-sample${structured ? "-json" : ""}`;
      return h("div", { class: "snippet" },
        h("div", { class: "snippet-head" },
          h("strong", { text: structured ? "With response_format (a JSON schema)" : "Plain" }),
          copyButton(text)),
        h("pre", { id: idName }, h("code", { text })));
    }));
  }
  render();
  return h("div", { class: "snippets" }, tabs, out);
}
