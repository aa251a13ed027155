// Calls to the management API with the session cookie. The browser sends the HttpOnly
// session cookie itself; every state-changing request repeats the session's CSRF token.

const BASE = "/api/public";
let csrfToken = null;
let onSignedOut = () => {};

export function setCsrf(token) {
  csrfToken = token;
}

export function whenSignedOut(callback) {
  onSignedOut = callback;
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function cookie(name) {
  const found = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : null;
}

// the header a state-changing request repeats the session's CSRF token in
export function csrfHeader() {
  return { "X-CSRF-Token": csrfToken || cookie("raydock_csrf") || "" };
}

export function errorMessage(body, status) {
  if (body && typeof body === "object" && body.error) {
    const err = body.error;
    if (Array.isArray(err.detail) && err.detail.length) {
      return err.detail.map((d) => (d.field ? `${d.field}: ${d.message}` : d.message)).join("; ");
    }
    return err.message || `HTTP ${status}`;
  }
  return typeof body === "string" && body ? body.slice(0, 300) : `HTTP ${status}`;
}

export async function request(method, path, body, { raw = false, url = null } = {}) {
  const headers = { Accept: raw ? "*/*" : "application/json" };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (method !== "GET" && method !== "HEAD") {
    Object.assign(headers, csrfHeader());
  }
  const response = await fetch(url || BASE + path, init);
  const text = await response.text();
  let data = text;
  if (!raw) {
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    const message = errorMessage(data, response.status);
    if (response.status === 401 && !url && path !== "/session") onSignedOut(message);
    throw new ApiError(response.status, message, data);
  }
  return data;
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body),
  patch: (path, body) => request("PATCH", path, body),
  del: (path) => request("DELETE", path),
};

// `pages` pages (each of the API's default size) of a list route that answers pages
// (`total`, `nextOffset`: null after the last), from `offset`: their rows under `key`, the
// list's `total`, and whether more follow
export async function listPages(path, key, { pages = Infinity, offset = 0, id = null } = {}) {
  const rows = [];
  const seen = new Set(); // `id`: a row pushed onto the next page by one added meanwhile, once
  let next = offset;
  let total = 0;
  for (let n = 0; next !== null && next !== undefined && n < pages; n++) {
    const page = await api.get(`${path}?offset=${next}`);
    for (const row of page[key]) {
      if (id && seen.has(row[id])) continue;
      if (id) seen.add(row[id]);
      rows.push(row);
    }
    total = page.total;
    next = page.nextOffset;
  }
  return { rows, total, more: next !== null && next !== undefined };
}
