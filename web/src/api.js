// The people API, from the web app: the login token travels only in the HttpOnly cookie the
// gateway set at login (no script can read it); every change carries the page's Origin, which
// the gateway checks.

/** An API refusal, with the problem+json answer's detail. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || `the server answered ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

let onUnauthorized = () => {};

/** What to do when the login is gone (expired, logged out elsewhere, revoked). */
export function whenLoggedOut(handler) {
  onUnauthorized = handler;
}

/** Calls the API: JSON in and out; a refusal throws an ApiError. */
export async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 204) return null;
  const type = response.headers.get('Content-Type') || '';
  const data = type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) {
    if (response.status === 401 && path !== '/v1/auth/session') onUnauthorized();
    throw new ApiError(response.status, typeof data === 'object' ? data : null);
  }
  return data;
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body);
