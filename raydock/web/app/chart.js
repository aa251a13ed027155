// A small SVG line chart: one series of {t (ms), v}, a zero baseline, the latest value.
const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

export function fmtNumber(v, digits = 2) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString();
  return Number(v.toFixed(digits)).toString();
}

export function lineChart({ title, unit = "", points, windowMs = 5 * 60 * 1000, id }) {
  const W = 320, H = 120, L = 36, R = 8, T = 22, B = 18;
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title,
  });
  if (id) root.id = id;
  const last = points.length ? points[points.length - 1] : null;
  const now = last ? last.t : Date.now();
  const shown = points.filter((p) => p.t >= now - windowMs && p.v !== null);
  const max = Math.max(0, ...shown.map((p) => p.v)) * 1.15 || 1; // all zero: a 0..1 scale
  const x = (t) => L + ((t - (now - windowMs)) / windowMs) * (W - L - R);
  const y = (v) => H - B - (v / max) * (H - T - B);
  root.append(
    svg("text", { x: 4, y: 14, class: "chart-title" }, title),
    svg("text", { x: W - R, y: 14, class: "chart-value", "text-anchor": "end" },
      last && last.v !== null ? `${fmtNumber(last.v)}${unit ? " " + unit : ""}` : "—"),
    svg("line", { x1: L, y1: y(0), x2: W - R, y2: y(0), class: "chart-axis" }),
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "chart-axis" }),
    svg("text", { x: L - 4, y: T + 8, class: "chart-tick", "text-anchor": "end" }, fmtNumber(max)),
    svg("text", { x: L - 4, y: H - B, class: "chart-tick", "text-anchor": "end" }, "0"),
    svg("text", { x: L, y: H - 4, class: "chart-tick" }, `-${Math.round(windowMs / 60000)} min`),
    svg("text", { x: W - R, y: H - 4, class: "chart-tick", "text-anchor": "end" }, "now"),
  );
  if (shown.length) {
    const coords = shown.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`);
    root.append(svg("polyline", { points: coords.join(" "), class: "chart-line" }));
    const p = shown[shown.length - 1];
    root.append(svg("circle", { cx: x(p.t), cy: y(p.v), r: 2.5, class: "chart-dot" }));
  }
  return root;
}
