// Prometheus text exposition (raydock's /metrics) read in the page: samples, sums, quantiles.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(LINE);
    if (!m) continue;
    const labels = {};
    for (const [, key, value] of (m[2] || "").matchAll(LABEL)) {
      labels[key] = value.replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
    }
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

const matches = (labels, want) => Object.entries(want).every(([k, v]) => labels[k] === v);

export function total(samples, name, want = {}) {
  return samples
    .filter((s) => s.name === name && matches(s.labels, want))
    .reduce((sum, s) => sum + s.value, 0);
}

// Cumulative bucket counts of a histogram, summed over label sets: [[le, count], ...] by le
export function buckets(samples, name, want = {}) {
  const byLe = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket` || !matches(s.labels, want)) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
}

// The bucket counts of `now` minus those of `before` (what arrived in between)
export function bucketDelta(now, before) {
  const old = new Map(before || []);
  return now.map(([le, count]) => [le, count - (old.get(le) || 0)]);
}

// Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank
export function quantile(q, cumulative) {
  if (!cumulative.length) return null;
  const count = cumulative[cumulative.length - 1][1];
  if (!(count > 0)) return null;
  const rank = q * count;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, c] of cumulative) {
    if (c >= rank) {
      if (le === Infinity) return prevLe;  // beyond the last finite bound
      const inBucket = c - prevCount;
      return inBucket > 0 ? prevLe + (le - prevLe) * ((rank - prevCount) / inBucket) : le;
    }
    prevLe = le;
    prevCount = c;
  }
  return prevLe;
}
