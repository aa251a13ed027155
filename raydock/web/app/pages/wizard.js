// The deploy wizard: General details → Optimization → Parameters → Hardware → Review → Deploy.
// A new deployment starts from the model's deploy form (pre-filled from its deployconfig.json);
// a redeploy from the deployment's current configuration. Every field's range and check come
// from the API's OpenAPI document (schema.js); the API's own 422 lands next to its field.
import { ApiError, api } from "../api.js";
import { problem, rangeText, rulesOf } from "../schema.js";
import { clear, h, toast } from "../ui.js";

const STEPS = [
  ["general", "General details"],
  ["optimization", "Optimization"],
  ["parameters", "Parameters"],
  ["hardware", "Hardware"],
  ["review", "Review"],
];

const LABELS = {
  name: "Deployment name",
  description: "Description",
  tags: "Tags",
  timeout: "Endpoint timeout (s)",
  optimizationType: "Optimization type",
  quantizationType: "Quantization type",
  temperature: "Temperature",
  maxTokens: "Max tokens",
  topP: "Top P",
  topK: "Top K",
  stopSequence: "Stop sequences (one per line)",
  maxLoadedAdapters: "Adapters kept loaded",
  maxAdapterRank: "Largest adapter rank",
  deviceType: "Device type",
  maxBatchSize: "Max batch size",
  minReplicas: "Min replicas",
  maxReplicas: "Max replicas",
  scaleUpDelay: "Scale-up delay (s)",
  scaleDownDelay: "Scale-down delay (s)",
  prefixCacheAffinity: "Prefix-cache affinity",
  imbalanceThreshold: "Imbalance threshold",
};

// which parts of the deploy body each step edits: top-level fields, or a nested model's fields
const STEP_FIELDS = {
  general: [["name"], ["description"], ["tags"], ["timeout"]],
  optimization: [["optimizationInfo", "*"]],
  parameters: [["hyperParameters", "*"], ["adapterParameters", "*"]],
  hardware: [["deviceType"], ["scalingParameters", "*"]],
};
const GROUPS = {
  optimizationInfo: "Engine and quantization",
  hyperParameters: "Generation defaults",
  adapterParameters: "LoRA adapters",
  scalingParameters: "Scaling",
  routingParameters: "Routing",
};
const OPTIONAL = new Set(["description", "tags", "stopSequence"]);
const KEEP = ["name", "description", "tags", "timeout", "deviceType", "hyperParameters",
  "scalingParameters", "optimizationInfo", "adapterParameters"];

function getPath(obj, path) {
  return path.reduce((o, k) => (o == null ? undefined : o[k]), obj);
}

function setPath(obj, path, value) {
  let o = obj;
  for (const k of path.slice(0, -1)) o = o[k] ??= {};
  o[path[path.length - 1]] = value;
}

// target: {modelId} for a new deployment, {deploymentId} for a redeploy
export function wizardPage(main, target) {
  const state = { step: 0, form: null, rules: null, devices: {}, fit: null, model: null,
    dep: null, prefilledFrom: null, accepted: false };
  const title = h("h1", { text: "Deploy" });
  const subtitle = h("p", { class: "muted", id: "wizard-source" });
  const stepper = h("ol", { class: "stepper" });
  const body = h("section", { class: "card wizard-body", id: "wizard" });
  const error = h("p", { class: "form-error", role: "alert", id: "wizard-error", hidden: true });
  const back = h("button", { type: "button", class: "btn ghost", text: "Back", onclick: () => go(-1) });
  const next = h("button", { type: "button", class: "btn primary", text: "Next", onclick: () => go(1) });
  const deploy = h("button", { type: "button", class: "btn primary", text: "Deploy",
    id: "wizard-deploy", onclick: submit });
  const crumbs = h("nav", { class: "crumbs" }, h("a", { href: "#/models", text: "Open-Source Models" }));
  main.append(crumbs, title, subtitle, stepper, body, error,
    h("div", { class: "actions wizard-actions" }, back, next, deploy));
  const inputs = new Map(); // "a.b" -> {input, error, path, rule}

  async function load() {
    const [rules, hardware] = await Promise.all([rulesOf("DeployRequest"), api.get("/hardware")]);
    state.rules = rules;
    state.devices = hardware;
    // a settings group the API gained that no step names yet: with the hardware
    const named = new Set(Object.values(STEP_FIELDS).flat().map((p) => p[0]));
    for (const [k, r] of Object.entries(rules.properties)) {
      if (!named.has(k) && r.type === "object" && r.properties) {
        STEP_FIELDS.hardware.push([k, "*"]);
        KEEP.push(k);
      }
    }
    let modelId = target.modelId;
    if (target.deploymentId) {
      state.dep = await api.get(`/deployments/${encodeURIComponent(target.deploymentId)}`);
      modelId = state.dep.modelId;
    }
    state.model = await api.get(`/models/${encodeURIComponent(modelId)}`);
    const defaults = await api.get(`/models/${encodeURIComponent(modelId)}/deploy-form`);
    state.fit = defaults.fit;
    state.defaults = defaults;
    if (state.dep) {
      state.form = Object.fromEntries(KEEP.map((k) => [k, structuredClone(
        state.dep.config[k] ?? (k === "timeout" ? state.dep.timeout : defaults.form[k]))]));
      // what the Configurations tab changed since (description, tags, timeout) is current
      state.form.name = state.dep.name;
      state.form.description = state.dep.description ?? state.form.description ?? "";
      state.form.tags = state.dep.tags ?? state.form.tags ?? [];
      state.form.timeout = state.dep.timeout ?? state.form.timeout;
      title.textContent = `Redeploy ${state.dep.name}`;
      subtitle.textContent = "Pre-filled from the current configuration; the redeploy adds a "
        + "new version to the deployment's history.";
      if (defaults.prefilledFrom) {
        subtitle.append(" ", h("button", { type: "button", class: "link", id: "use-deployconfig",
          text: `Use the model's ${defaults.prefilledFrom} instead`, onclick: () => {
            state.form = { ...structuredClone(defaults.form), name: state.dep.name,
              description: state.form.description, tags: state.form.tags };
            subtitle.textContent = `Pre-filled from the model's ${defaults.prefilledFrom}.`;
            render();
          } }));
      }
      crumbs.append(" / ", h("a", { href: `#/models/${encodeURIComponent(modelId)}`,
        text: state.model.name }), " / ",
      h("a", { href: `#/deployments/${encodeURIComponent(state.dep.deploymentId)}`,
        text: state.dep.name }));
    } else {
      state.form = { description: "", tags: [], ...structuredClone(defaults.form) };
      title.textContent = `Deploy ${state.model.name}`;
      subtitle.textContent = defaults.prefilledFrom
        ? `Pre-filled from the model's ${defaults.prefilledFrom}.`
        : "Pre-filled with the API's defaults.";
      crumbs.append(" / ", h("a", { href: `#/models/${encodeURIComponent(modelId)}`,
        text: state.model.name }));
    }
    render();
  }

  function ruleAt(path) {
    let rule = state.rules;
    for (const k of path) rule = rule?.properties?.[k];
    return rule || {};
  }

  // the step's fields, with nested models expanded: [["hyperParameters","temperature"], …]
  function fieldsOf(step) {
    return (STEP_FIELDS[step] || []).flatMap((path) => {
      if (path[path.length - 1] !== "*") return [path];
      const parent = path.slice(0, -1);
      return Object.keys(ruleAt(parent).properties || {}).map((k) => [...parent, k]);
    });
  }

  function readInput(path, rule, input) {
    const key = path[path.length - 1];
    if (rule.type === "integer" || rule.type === "number") {
      return input.value.trim() === "" ? null : Number(input.value);
    }
    if (rule.type === "boolean" && rule.nullable) {
      return input.value === "" ? null : input.value === "true";
    }
    if (rule.type === "boolean") return input.checked;
    if (rule.type === "array") {
      const sep = key === "tags" ? "," : "\n";
      return input.value.split(sep).map((t) => t.trim()).filter(Boolean);
    }
    return input.value;
  }

  function field(path) {
    const key = path[path.length - 1];
    const dotted = path.join(".");
    const rule = ruleAt(path);
    const value = getPath(state.form, path);
    const id = `f-${dotted.replace(/\./g, "-")}`;
    let input;
    if (key === "deviceType") {
      input = h("select", { id, name: dotted },
        Object.entries(state.devices).map(([name, p]) => {
          const fit = state.fit?.deviceTypes?.[name];
          const notes = [p.device === "cpu" ? `${p.num_cpus} CPU, ${p.memory_gb} GiB`
            : `${p.num_gpus}× ${p.accelerator_type || "GPU"}`];
          if (fit) notes.push(fit.fits ? `fits (${fit.requiredGiB} GiB needed)` : "model does not fit");
          if (!p.available) notes.push("not on this cluster now");
          return h("option", { value: name, text: `${name} — ${notes.join(", ")}`,
            selected: name === value });
        }));
    } else if (rule.enum) {
      input = h("select", { id, name: dotted }, rule.enum.map((v) => h("option", {
        value: v, text: v === "" ? "(none)" : v, selected: v === (value ?? rule.default) })));
    } else if (rule.type === "boolean" && rule.nullable) {
      input = h("select", { id, name: dotted }, [["", "automatic (default)"], ["true", "on"],
        ["false", "off"]].map(([v, label]) => h("option", { value: v, text: label,
        selected: v === (value === null || value === undefined ? "" : String(value)) })));
    } else if (rule.type === "boolean") {
      input = h("input", { id, name: dotted, type: "checkbox", checked: Boolean(value) });
    } else if (rule.type === "array") {
      const sep = key === "tags" ? ", " : "\n";
      input = h(key === "tags" ? "input" : "textarea", { id, name: dotted,
        placeholder: key === "tags" ? "comma-separated" : "" });
      input.value = (value || []).join(sep);
    } else if (rule.type === "integer" || rule.type === "number") {
      // no min/max attributes: the page's own check (the API's rule) speaks, not the browser's
      input = h("input", { id, name: dotted, type: "number", inputmode: "decimal",
        step: rule.type === "integer" ? 1 : "any" });
      input.value = value ?? "";
    } else {
      input = h("input", { id, name: dotted, maxlength: rule.maxLength });
      input.value = value ?? "";
    }
    const err = h("p", { class: "field-error", role: "alert", "data-error-for": dotted, hidden: true });
    const hint = [rangeText(rule), rule.description].filter(Boolean).join(" · ");
    const onChange = () => {
      setPath(state.form, path, readInput(path, rule, input));
      showProblem(dotted);
    };
    input.addEventListener("input", onChange);
    input.addEventListener("change", onChange);
    inputs.set(dotted, { input, err, path, rule });
    const wrap = h("div", { class: "field",
      "data-field": dotted },
    h("label", { for: id, text: LABELS[key] || rule.title || key }), input,
    hint ? h("p", { class: "hint", "data-range-for": dotted, text: hint }) : null, err);
    return wrap;
  }

  // the field's problem from the form's state (its step need not be on screen)
  function check(dotted) {
    const path = dotted.split(".");
    const rule = ruleAt(path);
    const key = path[path.length - 1];
    const required = !OPTIONAL.has(key) && !rule.nullable;
    return problem(dotted, { ...rule, required }, getPath(state.form, path));
  }

  function showProblem(dotted, message = check(dotted)) {
    const slot = inputs.get(dotted);
    if (!slot) return;
    slot.err.textContent = message || "";
    slot.err.hidden = !message;
    slot.input.setAttribute("aria-invalid", message ? "true" : "false");
  }

  function stepProblems(stepIndex) {
    return fieldsOf(STEPS[stepIndex][0]).map((p) => p.join("."))
      .map((d) => [d, check(d)]).filter(([, m]) => m);
  }

  function render() {
    const [step] = STEPS[state.step];
    clear(stepper, STEPS.map(([key, label], i) => h("li", {
      class: i === state.step ? "active" : i < state.step ? "done" : "",
      "aria-current": i === state.step ? "step" : undefined, "data-step": key }, label)));
    inputs.clear();
    error.hidden = true;
    if (step === "review") {
      clear(body, review());
    } else {
      const groups = (STEP_FIELDS[step] || []).map((path) => {
        const fields = fieldsOf(step).filter((p) => p[0] === path[0]);
        const label = path.length > 1 ? GROUPS[path[0]] || ruleAt([path[0]]).title : null;
        const sectionErr = path.length > 1 ? h("p", { class: "field-error", role: "alert",
          "data-error-for": path[0], hidden: true }) : null;
        return h("fieldset", { class: "group" }, label ? h("legend", { text: label }) : null,
          sectionErr, fields.map(field));
      });
      clear(body, h("h2", { text: STEPS[state.step][1] }), groups);
    }
    back.disabled = state.step === 0;
    next.hidden = step === "review";
    deploy.hidden = step !== "review";
    deploy.disabled = !state.accepted;
  }

  function review() {
    const f = state.form;
    const rows = [
      ["Deployment name", f.name], ["Description", f.description || "—"],
      ["Tags", (f.tags || []).join(", ") || "—"], ["Endpoint timeout", `${f.timeout} s`],
      ["Optimization", `${f.optimizationInfo.optimizationType || "none"} / `
        + `${f.optimizationInfo.quantizationType || "no quantization"}`],
      ["Parameters", Object.entries(f.hyperParameters).map(([k, v]) =>
        `${k} ${Array.isArray(v) ? JSON.stringify(v) : v}`).join(", ")],
      ["Adapters", Object.entries(f.adapterParameters || {}).map(([k, v]) => `${k} ${v}`).join(", ")],
      ["Hardware", f.deviceType],
      ["Scaling", Object.entries(f.scalingParameters).map(([k, v]) => `${k} ${v}`).join(", ")],
    ];
    const terms = h("input", { type: "checkbox", id: "accept-terms", checked: state.accepted });
    terms.addEventListener("change", () => {
      state.accepted = terms.checked;
      deploy.disabled = !state.accepted;
    });
    return h("div", {},
      h("h2", { text: "Review" }),
      h("table", { class: "grid review", id: "wizard-review" },
        h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { scope: "row", text: k }),
          h("td", { text: v }))))),
      h("label", { class: "terms", for: "accept-terms" }, terms,
        " I accept all the Terms and Conditions"));
  }

  function go(delta) {
    if (delta > 0) {
      const problems = stepProblems(state.step);
      for (const [d, m] of problems) showProblem(d, m);
      if (problems.length) {
        inputs.get(problems[0][0]).input.focus();
        return;
      }
    }
    state.step = Math.max(0, Math.min(STEPS.length - 1, state.step + delta));
    render();
  }

  function payload() {
    const out = structuredClone(state.form);
    if (state.dep) out.isDeployedPreviously = true;
    return out;
  }

  // the API refused: each field's message next to the field, on the first step holding one
  function showApiErrors(err) {
    const detail = err.body?.detail || err.body?.error?.detail || [];
    const fields = detail.length ? detail : [{ field: err.body?.error?.param, message: err.message }];
    const stepOf = (f) => STEPS.findIndex(([key]) => fieldsOf(key)
      .some((p) => f === p.join(".") || f === p[0] || f.startsWith(p.join(".") + ".")));
    const placed = fields.filter((d) => d.field && stepOf(d.field) >= 0);
    if (err.status === 422 && placed.length) {
      state.step = Math.min(...placed.map((d) => stepOf(d.field)));
      render();
      for (const d of placed) {
        const slot = document.querySelector(`[data-error-for="${CSS.escape(d.field)}"]`)
          || document.querySelector(`[data-error-for="${CSS.escape(d.field.split(".")[0])}"]`);
        if (slot) {
          slot.textContent = d.message;
          slot.hidden = false;
        }
      }
      error.textContent = "The API refused the deployment: see the marked field.";
      error.hidden = false;
      return;
    }
    error.textContent = err.message;
    error.hidden = false;
  }

  async function submit() {
    for (let i = 0; i < STEPS.length - 1; i++) {
      if (stepProblems(i).length) {
        state.step = i;
        render();
        for (const [d, m] of stepProblems(i)) showProblem(d, m);
        return;
      }
    }
    deploy.disabled = true;
    error.hidden = true;
    try {
      let ref;
      if (state.dep) {
        ref = await api.post(`/deployments/${encodeURIComponent(state.dep.deploymentId)}/redeploy`,
          payload());
      } else {
        ref = await api.post(
          `/models/${encodeURIComponent(state.model.modelId)}/deploy?modelType=openSource`, payload());
      }
      toast(`${state.form.name}: deploying`);
      location.hash = `#/deployments/${encodeURIComponent(ref.deploymentId
        || state.dep.deploymentId)}/endpoint`;
    } catch (err) {
      if (err instanceof ApiError) {
        showApiErrors(err);
      } else {  // no answer (the network, a server restarting): the deploy may have started
        const what = state.dep ? "its history" : "the model's deployments";
        error.textContent = `The deploy request failed (${err.message}); it may have reached `
          + `the platform: check ${what} before trying again.`;
        error.hidden = false;
      }
      deploy.disabled = !state.accepted;
    }
  }

  load().catch((err) => {
    error.textContent = err.message;
    error.hidden = false;
  });
}
