// The API's own rules for a form: read from its OpenAPI document (generated from the pydantic
// models that validate every request), so the page checks exactly what the API checks and a
// changed range shows up here without a change to the page.
import { request } from "./api.js";

let docPromise = null;

export function openapi() {
  if (!docPromise) {
    docPromise = request("GET", null, undefined, { url: "/openapi.json" }).catch((err) => {
      docPromise = null;
      throw err;
    });
  }
  return docPromise;
}

function resolve(doc, schema) {
  if (schema && schema.$ref) {
    return resolve(doc, doc.components.schemas[schema.$ref.split("/").pop()]);
  }
  // `X | None`: the non-null alternative carries the rules
  if (schema && schema.anyOf) {
    const real = schema.anyOf.filter((s) => s.type !== "null");
    if (real.length === 1) return { ...schema, ...resolve(doc, real[0]), nullable: true };
  }
  return schema || {};
}

// {field: rule} of a component schema; a nested model is {field: {properties: {...}}}
export async function rulesOf(name) {
  const doc = await openapi();
  const walk = (schema) => {
    const s = resolve(doc, schema);
    if (s.type === "object" && s.properties) {
      return {
        ...s,
        properties: Object.fromEntries(Object.entries(s.properties)
          .map(([k, v]) => [k, walk(v)])),
      };
    }
    if (s.type === "array" && s.items) return { ...s, items: resolve(doc, s.items) };
    return s;
  };
  return walk({ $ref: `#/components/schemas/${name}` });
}

// "0–2", "≤ 2000 characters", "up to 8"… as the field's hint
export function rangeText(rule) {
  if (rule.enum) return rule.enum.map((v) => (v === "" ? "(none)" : v)).join(", ");
  if (rule.minimum !== undefined || rule.maximum !== undefined) {
    const lo = rule.minimum ?? "";
    const hi = rule.maximum ?? "";
    return `${rule.type === "integer" ? "whole number " : ""}${lo}–${hi}`;
  }
  if (rule.type === "string" && rule.maxLength) return `up to ${rule.maxLength} characters`;
  if (rule.type === "array" && rule.maxItems) return `up to ${rule.maxItems}`;
  return "";
}

// The API's message for a value that breaks `rule` (schemas.describe_error's words), or null.
export function problem(field, rule, value) {
  if (value === null || value === undefined) {
    if (rule.required) return `${field}: a value is required`;
    return null;
  }
  if (rule.type === "number" || rule.type === "integer") {
    if (typeof value !== "number" || Number.isNaN(value)) return `${field}: enter a number`;
    if (rule.type === "integer" && !Number.isInteger(value)) {
      return `${field}: enter a whole number`;
    }
    const lo = rule.minimum ?? rule.exclusiveMinimum;
    const hi = rule.maximum ?? rule.exclusiveMaximum;
    const below = rule.minimum !== undefined ? value < rule.minimum
      : rule.exclusiveMinimum !== undefined && value <= rule.exclusiveMinimum;
    const above = rule.maximum !== undefined ? value > rule.maximum
      : rule.exclusiveMaximum !== undefined && value >= rule.exclusiveMaximum;
    if (below || above) return `${field} must be between ${lo} and ${hi} (got ${value})`;
  }
  if (rule.type === "string") {
    if (rule.minLength && value.length < rule.minLength) {
      return `${field}: at least ${rule.minLength} character${rule.minLength > 1 ? "s" : ""}`;
    }
    if (rule.maxLength && value.length > rule.maxLength) {
      return `${field}: at most ${rule.maxLength} characters (got ${value.length})`;
    }
    if (rule.enum && !rule.enum.includes(value)) {
      return `${field}: one of ${rule.enum.join(", ")}`;
    }
  }
  if (rule.type === "array") {
    if (rule.maxItems !== undefined && value.length > rule.maxItems) {
      return `${field}: at most ${rule.maxItems} (got ${value.length})`;
    }
    for (const [i, item] of value.entries()) {
      const p = problem(`${field}.${i}`, { ...rule.items, required: true }, item);
      if (p) return p;
    }
  }
  return null;
}
