// Deployment history: every `_vN`, the latest marked; a version's details (parameters,
// hardware, optimization, who, start/end, duration, status with the failure reason on hover,
// undeployment) open below its row.
import { api, listPages } from "../api.js";
import { badge, clear, fmtDate, fmtDuration, h, pollList, table } from "../ui.js";
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
  const older = h("button", { type: "button", class: "btn", id: "history-older", hidden: true,
    onclick: () => {
      pages += 1;
      refresh();
    } });
  body.append(el, h("div", { class: "list-more" }, older));
  const open = new Set(); // versions whose details are shown, kept across refreshes
  let versions = [];
  let shown = "";
  let pages = 1; // pages of the newest versions shown; "Show older" adds one
  let hidden = 0; // older versions not shown

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

  // the newest `pages` pages: the API lists versions oldest first, so they are its last
  async function newest(path) {
    const first = await api.get(path);
    if (first.nextOffset === null || first.nextOffset === undefined) {
      return { rows: first.versions, hidden: 0 };
    }
    const offset = Math.max(0, first.total - pages * first.limit);
    return { ...(await listPages(path, "versions", { pages, offset })), hidden: offset };
  }

  async function refresh() {
    ({ rows: versions, hidden } = await newest(`/deployments/${id}/history`));
    older.hidden = hidden === 0;
    older.textContent = `Show older versions (${hidden} more)`;
    const signature = JSON.stringify(versions);
    if (signature === shown) return;
    shown = signature;
    render();
  }
  return pollList(el, refresh, POLL_MS);
}
