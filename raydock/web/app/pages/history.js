// Deployment history: every `_vN`, the latest marked; a version's details (parameters,
// hardware, optimization, who, start/end, duration, status with the failure reason on hover,
// undeployment) open below its row.
import { api } from "../api.js";
import { badge, clear, fmtDate, fmtDuration, h, poll, table } from "../ui.js";
import { POLL_MS } from "./models.js";

const pairs = (obj) => Object.entries(obj || {})
  .map(([k, v]) => `${k}: ${Array.isArray(v) ? JSON.stringify(v) : v === "" ? "—" : v}`);

function details(v) {
  const c = v.config || {};
  const u = v.undeployment;
  const opt = c.optimizationInfo || {};
  const section = (title, lines) => h("div", { class: "detail" }, h("h4", { text: title }),
    h("ul", {}, lines.map((l) => h("li", { text: l }))));
  return h("div", { class: "version-details", "data-details-for": v.version },
    section("Parameters", pairs(c.hyperParameters)),
    section("Hardware", [`deviceType: ${c.deviceType || "—"}`, ...pairs(c.scalingParameters)]),
    section("Optimization", [`optimizationType: ${opt.optimizationType || "none"}`,
      `quantizationType: ${opt.quantizationType || "none"}`]),
    section("Deployment", [`by ${v.deployedBy || "—"}`, `started ${fmtDate(v.startedAt)}`,
      `ended ${fmtDate(v.endedAt)}`, `duration ${fmtDuration(v.durationSeconds)}`,
      `status ${v.result || "in progress"}`, ...(v.failureReason ? [`reason: ${v.failureReason}`] : []),
      `endpoint timeout ${c.timeout ?? "—"} s`]),
    section("Undeployment", u ? [`by ${u.undeployedBy || "—"}`, `started ${fmtDate(u.startedAt)}`,
      `ended ${fmtDate(u.endedAt)}`] : ["not undeployed"]));
}

export function historyTab(body, id) {
  const { el, tbody } = table(
    ["Version", "Status", "Deployed By", "Started", "Ended", "Duration", "Undeployed", ""],
    "history");
  body.append(el);
  const open = new Set(); // versions whose details are shown, kept across refreshes
  let versions = [];
  let shown = "";

  function render() {
    clear(tbody, [...versions].reverse().flatMap((v) => {
      const u = v.undeployment;
      const toggle = h("button", { type: "button", class: "btn small",
        "aria-expanded": String(open.has(v.version)), "aria-label": `Details of ${v.name}`,
        text: open.has(v.version) ? "Hide" : "Details",
        onclick: () => {
          if (open.has(v.version)) open.delete(v.version);
          else open.add(v.version);
          render();
        } });
      const row = h("tr", { dataset: { version: v.version } },
        h("td", {}, v.name, v.latest ? h("span", { class: "tag latest", text: "Latest" }) : null),
        // the failure reason on hover (title), as the seed's history shows it
        h("td", {}, v.result ? badge(v.result, undefined, v.failureReason || undefined)
          : badge("DEPLOYING", "In progress")),
        h("td", { text: v.deployedBy || "—" }),
        h("td", { text: fmtDate(v.startedAt) }),
        h("td", { text: fmtDate(v.endedAt) }),
        h("td", { text: fmtDuration(v.durationSeconds) }),
        h("td", { text: u ? `${u.undeployedBy || "—"}, ${fmtDate(u.endedAt || u.startedAt)}` : "—" }),
        h("td", {}, toggle));
      if (!open.has(v.version)) return [row];
      return [row, h("tr", { class: "details-row" }, h("td", { colspan: 8 }, details(v)))];
    }));
  }

  async function refresh() {
    versions = (await api.get(`/deployments/${id}/history`)).versions;
    const signature = JSON.stringify(versions);
    if (signature === shown) return;
    shown = signature;
    render();
  }
  return poll(refresh, POLL_MS);
}
