// Metrics: the last hour of the deployment's figures, kept by the platform's meter
// (GET …/metrics/history, one point per 10 s and a live last one), drawn with uPlot (vendored,
// vendor/uplot/README.md): requests/s, tokens/s, TTFT p50/p95, errors/s, replicas.
import uPlot from "../vendor/uplot/uPlot.esm.js";
import { api } from "../api.js";
import { clear, h, poll } from "../ui.js";
import { POLL_MS } from "./models.js";

const CHARTS = [
  { id: "requests", title: "Requests/s", series: [["requestsPerSecond", "requests/s", "#2f5bea"]] },
  { id: "tokens", title: "Tokens/s", series: [["tokensPerSecond", "tokens/s", "#127a3b"]] },
  { id: "ttft", title: "Time to first token (s)",
    series: [["ttftP50", "p50", "#2f5bea"], ["ttftP95", "p95", "#b54708"]] },
  { id: "errors", title: "Errors/s (4xx/5xx)", series: [["errorsPerSecond", "errors/s", "#b42318"]] },
  { id: "replicas", title: "Replicas",
    series: [["replicas", "current", "#2f5bea"], ["replicasTarget", "target", "#7a5af8"],
      ["min", "min", "#98a2b3"], ["max", "max", "#475467"]] },
];

// The requests of the window: the sum of each interval's count (`requests`). A rate times
// `intervalSeconds` undercounts: the first interval's start is not known, and intervals differ.
export function requestsInWindow(points) {
  return points.reduce((sum, p) => sum + (p.requests || 0), 0);
}

export function fmtNumber(v, digits = 2) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString();
  return Number(v.toFixed(digits)).toString();
}

function columns(history, chart) {
  const pts = history.points;
  const xs = pts.map((p) => p.t);
  const ys = chart.series.map(([key]) => pts.map((p) => {
    if (key === "min") return history.replicasMin ?? null;
    if (key === "max") return history.replicasMax ?? null;
    return p[key] ?? null;
  }));
  return [xs, ...ys];
}

function makePlot(chart, el, data) {
  const width = Math.max(260, el.clientWidth - 2);
  return new uPlot({
    width,
    height: 180,
    scales: {
      // always the last hour, ending at the latest point (or now)
      x: { time: true, range: (u) => {
        const xs = u.data[0];
        const end = xs.length ? xs[xs.length - 1] : Date.now() / 1000;
        return [end - 3600, end];
      } },
      // from 0; an all-zero series on a 0..1 scale
      y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.15 : 1] },
    },
    axes: [{ stroke: "#667085" }, { stroke: "#667085", size: 48 }],
    series: [{}, ...chart.series.map(([, label, color]) => ({
      label, stroke: color, width: 1.8, spanGaps: false,
      value: (u, v) => fmtNumber(v),
    }))],
  }, data, el);
}

export function metricsTab(body, id) {
  const tiles = h("div", { class: "tiles" });
  const grid = h("div", { class: "charts" });
  const note = h("p", { class: "muted", id: "metrics-note" });
  body.append(tiles, grid, note);
  const plots = new Map();
  const boxes = new Map(CHARTS.map((c) => {
    const plotEl = h("div", { class: "plot" });
    const box = h("figure", { class: "chart-card", id: `chart-${c.id}` },
      h("figcaption", { text: c.title }), plotEl);
    grid.append(box);
    return [c.id, { box, plotEl }];
  }));

  const tile = (label, value, idName) => h("div", { class: "tile" },
    h("div", { class: "tile-label", text: label }),
    h("div", { class: "tile-value", id: idName, text: value }));

  async function refresh() {
    let history;
    try {
      history = await api.get(`/deployments/${id}/metrics/history`);
    } catch (err) {
      note.textContent = `Metrics are not available: ${err.message}`;
      return;
    }
    const pts = history.points;
    const last = pts.length ? pts[pts.length - 1] : {};
    const withTtft = pts.filter((p) => p.ttftP50 !== null);
    const lastTtft = withTtft.length ? withTtft[withTtft.length - 1] : null;
    clear(tiles,
      tile("Requests (last hour)", Math.round(requestsInWindow(pts)).toLocaleString(),
        "metric-requests"),
      tile("Requests/s now", fmtNumber(last.requestsPerSecond), "metric-rps"),
      tile("TTFT p50 (latest)", lastTtft ? `${fmtNumber(lastTtft.ttftP50 * 1000, 0)} ms` : "—",
        "metric-ttft"),
      tile("Replicas", `${last.replicas ?? "—"} / target ${last.replicasTarget ?? "—"}`
        + ` (${history.replicasMin ?? "—"}–${history.replicasMax ?? "—"})`, "metric-replicas"));
    for (const chart of CHARTS) {
      const data = columns(history, chart);
      const { box, plotEl } = boxes.get(chart.id);
      box.dataset.points = String(pts.length);
      const plot = plots.get(chart.id);
      if (plot) plot.setData(data);
      else plots.set(chart.id, makePlot(chart, plotEl, data));
    }
    note.textContent = `The platform's own figures (all replicas and nodes): one point per `
      + `${history.intervalSeconds} s over the last hour, kept by its meter; TTFT quantiles of `
      + "the requests in each interval. Refreshed every 3 s.";
  }
  const stop = poll(refresh, POLL_MS);
  return () => {
    stop();
    for (const plot of plots.values()) plot.destroy();
  };
}
