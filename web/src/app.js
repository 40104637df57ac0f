// The people's web app: log in, see one's own sessions and those of the people one may see, plot
// them, follow a live session, follow a metric over weeks, manage relationships and consent,
// devices, the access log, the export and erasure. It speaks only the people API, whose one
// access policy decides everything: the app adds no rule of its own.

import { ApiError, api, get, post, whenLoggedOut } from './api.js';
import { announce, day, duration, exerciseName, field, h, num, replace, table, when } from './dom.js';
import { linePlot, signalFigure } from './plots.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');

/** The logged-in person (`/v1/me`), everyone they may see (`/v1/me/people`), the catalog. */
const state = { me: null, people: [], catalog: new Map() };

/** A page that was left before it finished: it must not draw over the next one. */
class Stale extends Error {}

let generation = 0;
let leaving = [];

/**
 * The page being shown: it renders only while it is the current one, and what it started
 * (live feeds, plots, timers, listeners) is stopped when the person leaves it.
 */
function newView() {
  for (const stop of leaving) {
    try { stop(); } catch { /* stopping one thing never keeps the others running */ }
  }
  leaving = [];
  const mine = ++generation;
  const alive = () => mine === generation;
  return {
    alive,
    onLeave(stop) { if (alive()) leaving.push(stop); else stop(); },
    render(title, ...parts) {
      if (!alive()) throw new Stale();
      render(title, ...parts);
    },
  };
}

const KEY_METRICS = [
  ['mean_hr_bpm', 'HR', 'bpm', 0],
  ['rmssd_ms', 'RMSSD', 'ms', 1],
  ['spo2_mean_pct', 'SpO₂', '%', 1],
  ['spo2_below_90_s', 'below 90 %', 's', 0],
];
const METRICS = {
  mean_hr_bpm: ['Mean heart rate', 'bpm', 1],
  mean_rr_ms: ['Mean RR interval', 'ms', 1],
  rmssd_ms: ['RMSSD', 'ms', 1],
  sdnn_ms: ['SDNN', 'ms', 1],
  pnn50_pct: ['pNN50', '%', 1],
  hrv_coherence_ratio: ['HRV coherence', 'ratio', 2],
  spo2_mean_pct: ['Mean SpO₂', '%', 1],
  spo2_min_pct: ['Lowest SpO₂', '%', 1],
  spo2_below_90_s: ['Time below 90 % SpO₂', 's', 0],
  eeg_delta_uv2: ['EEG delta power', 'µV²', 2],
  eeg_theta_uv2: ['EEG theta power', 'µV²', 2],
  eeg_alpha_uv2: ['EEG alpha power', 'µV²', 2],
  eeg_beta_uv2: ['EEG beta power', 'µV²', 2],
};
const BANDS = ['eeg_delta_uv2', 'eeg_theta_uv2', 'eeg_alpha_uv2', 'eeg_beta_uv2'];
const PLOT_ORDER = ['rr_interval', 'heart_rate', 'spo2', 'ppg', 'eeg', 'ecg', 'eda', 'respiration', 'skin_temperature'];
const RELATIONSHIPS = {
  parent_child: ['parent', 'child'],
  guardian_ward: ['guardian', 'ward'],
  practitioner_patient: ['practitioner', 'patient'],
  coach_athlete: ['coach', 'athlete'],
};

// ------------------------------------------------------------------------------------------
// Routing

const ROUTES = [
  [/^#\/login$/, loginPage, false],
  [/^#\/signup$/, signupPage, false],
  [/^#\/$/, homePage, true],
  [/^#\/sessions\/([0-9a-f-]{36})$/, sessionPage, true],
  [/^#\/trends$/, trendsPage, true],
  [/^#\/people$/, peoplePage, true],
  [/^#\/devices$/, devicesPage, true],
  [/^#\/access-log$/, accessLogPage, true],
  [/^#\/account$/, accountPage, true],
];

async function route() {
  const hash = location.hash.startsWith('#/') ? location.hash : '#/';
  const view = newView();
  const found = ROUTES.map(([pattern, page, login]) => [hash.match(pattern), page, login])
    .find(([match]) => match);
  if (!found) {
    view.render('Not found', h('p', {}, 'There is no such page. '), h('a', { href: '#/' }, 'Go home'));
    return;
  }
  const [match, page, needsLogin] = found;
  try {
    if (needsLogin && !state.me) {
      try {
        await loadMe();
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 401) throw error;
        if (view.alive()) location.replace('#/login');
        return;
      }
    }
    if (!view.alive()) return;
    renderNav(hash);
    await page(view, ...match.slice(1));
  } catch (error) {
    if (error instanceof Stale || !view.alive()) return;
    if (error instanceof ApiError && error.status === 401) return;
    view.render('Something went wrong', h('p', { class: 'error', role: 'alert' }, error.message));
  }
}

async function loadMe() {
  state.me = await get('/v1/me');
  state.people = await get('/v1/me/people');
  if (!state.catalog.size) {
    for (const dataType of await get('/v1/data-types')) state.catalog.set(dataType.name, dataType);
  }
}

whenLoggedOut(() => {
  // Only someone who was logged in is told that their login ended.
  const wasLoggedIn = state.me !== null;
  state.me = null;
  renderNav('');
  if (wasLoggedIn) {
    location.hash = '#/login';
    announce('Your login has ended: please log in again.', 'error');
  }
});

/** Puts a page on the screen: its heading, focused (for keyboards and screen readers), and its parts. */
function render(title, ...parts) {
  document.title = `${title} — biofeed`;
  const heading = h('h1', { tabindex: '-1' }, title);
  delete main.dataset.ready;
  replace(main, heading, ...parts);
  heading.focus();
}

function renderNav(hash) {
  if (!state.me) { replace(nav); return; }
  const link = (href, text) => h('a', { href, 'aria-current': hash === href ? 'page' : null }, text);
  replace(nav,
    link('#/', 'Sessions'),
    link('#/trends', 'Trends'),
    link('#/people', 'People'),
    link('#/devices', 'Devices'),
    link('#/access-log', 'Who saw my data'),
    link('#/account', 'Account'),
    h('button', { type: 'button', class: 'link', on: { click: logOut } }, 'Log out'));
}

async function logOut() {
  try { await post('/v1/auth/logout'); } catch { /* the login is gone either way */ }
  state.me = null;
  renderNav('');
  location.hash = '#/login';
  announce('You are logged out.');
}

/** A form whose submission calls `action(values)`; a refusal is shown next to it. */
function form(label, fields, submitText, action, extraProps = {}) {
  const error = h('p', { class: 'error', role: 'alert' });
  const button = h('button', { type: 'submit', class: extraProps.danger ? 'danger' : null }, submitText);
  const el = h('form', { 'aria-label': label, novalidate: extraProps.novalidate }, fields, error, button);
  el.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    button.disabled = true;
    try {
      await action(Object.fromEntries(new FormData(el)), el);
    } catch (e) {
      if (e instanceof Stale) return; // the person went to another page meanwhile
      const where = e.problem?.field ? ` (${e.problem.field})` : '';
      error.textContent = `${e.message}${where}`;
    } finally {
      button.disabled = false;
    }
  });
  return el;
}

/** A button that POSTs to `path`, says `done`, then shows the page again with `then()`. */
function postButton(label, path, done, then) {
  return h('button', {
    type: 'button',
    on: {
      click: async () => {
        try {
          await post(path);
          announce(done);
          await then();
        } catch (e) {
          if (!(e instanceof Stale)) announce(e.message, 'error');
        }
      },
    },
  }, label);
}

function personName(userId) {
  if (state.me && userId === state.me.user_id) return 'you';
  const person = state.people.find((p) => p.user_id === userId);
  if (person) return person.first_name || 'someone without a first name';
  return `person ${userId.slice(0, 8)}…`;
}

function copyButton(text, label) {
  return h('button', {
    type: 'button',
    on: {
      click: async () => {
        try {
          await navigator.clipboard.writeText(text);
          announce(`${label} copied.`);
        } catch {
          announce(`Could not copy: select the ${label.toLowerCase()} and copy it yourself.`, 'error');
        }
      },
    },
  }, `Copy ${label.toLowerCase()}`);
}

// ------------------------------------------------------------------------------------------
// Login and sign-up

async function loginPage(view) {
  renderNav('');
  view.render('Log in',
    form('Log in', [
      field('Email', { type: 'email', name: 'email', required: true, autocomplete: 'username' }),
      field('Password', { type: 'password', name: 'password', required: true, autocomplete: 'current-password' }),
    ], 'Log in', async ({ email, password }) => {
      await post('/v1/auth/session', { email, password });
      await loadMe();
      location.hash = '#/';
    }),
    h('p', {}, 'No account yet? ', h('a', { href: '#/signup' }, 'Sign up')));
}

async function signupPage(view) {
  renderNav('');
  const terms = await get('/v1/terms');
  view.render('Sign up',
    form('Sign up', [
      field('Email', { type: 'email', name: 'email', required: true, autocomplete: 'email' }),
      field('Password', { type: 'password', name: 'password', required: true, minlength: 10, autocomplete: 'new-password' },
        'At least 10 characters.'),
      field('First name', { name: 'first_name', autocomplete: 'given-name' }),
      field('Date of birth', { type: 'date', name: 'birth_date', required: true, autocomplete: 'bday' },
        'Decides whether a guardian must agree to a practitioner seeing your data.'),
      field('Country', { name: 'country', required: true, maxlength: 2, autocomplete: 'country' },
        'Two letters, e.g. DE, FR, US: it sets the age of consent.'),
      field('I am', { name: 'role', options: [['user', 'a person recording sessions'], ['guardian', 'a parent or guardian'], ['practitioner', 'a practitioner or coach']] }),
      h('div', { class: 'field check' },
        h('input', { type: 'checkbox', id: 'accept', name: 'accept', required: true }),
        h('label', { for: 'accept' }, `I accept the terms of use (version ${terms.version})`)),
    ], 'Create my account', async (values) => {
      if (!values.accept) throw new Error('Please accept the terms of use.');
      const profile = { birth_date: values.birth_date || undefined, country: values.country.toUpperCase() || undefined };
      if (values.first_name) profile.first_name = values.first_name;
      await post('/v1/users', {
        email: values.email, password: values.password, role: values.role, accept_terms: terms.version, profile,
      });
      await post('/v1/auth/session', { email: values.email, password: values.password });
      await loadMe();
      location.hash = '#/';
      announce('Welcome to biofeed.');
    }),
    h('p', {}, 'Have an account? ', h('a', { href: '#/login' }, 'Log in')));
}

// ------------------------------------------------------------------------------------------
// Home: recent sessions of everyone one may see

function lengthOf(session) {
  const end = session.ended_at ? new Date(session.ended_at) : new Date();
  const text = duration((end - new Date(session.started_at)) / 1000);
  return session.ended_at ? text : `${text} so far`;
}

function keyMetrics(metrics) {
  if (!metrics) return '—';
  const parts = KEY_METRICS.map(([name, label, unit, digits]) => {
    const m = metrics.metrics.find((x) => x.metric === name && x.channel === 0);
    return m ? `${label} ${num(m.value, digits)} ${unit}` : null;
  }).filter(Boolean);
  return parts.length ? parts.join(' · ') : '—';
}

/** `work` over `items`, at most `limit` at a time (a practitioner's many patients, politely). */
async function mapLimit(items, limit, work) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await work(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

async function homePage(view) {
  // Whom one may see changes (a revocation, an acceptance): asked again on every visit.
  state.people = await get('/v1/me/people');
  const sections = await mapLimit(state.people, 3, async (person) => {
    let sessions;
    try {
      sessions = await get(`/v1/users/${person.user_id}/sessions?limit=10`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) return null; // no longer visible
      throw error;
    }
    const metrics = await mapLimit(sessions, 4, (s) => (s.status === 'completed'
      ? get(`/v1/sessions/${s.session_id}/metrics`).catch(() => null) : null));
    const heading = person.relationship === 'self'
      ? 'Your sessions'
      : `${person.first_name || 'Someone without a first name'} (your ${RELATIONSHIPS[person.relationship]?.[1] || 'follower'})`;
    const rows = sessions.map((s, i) => [
      h('a', { href: `#/sessions/${s.session_id}` }, exerciseName(s.exercise)),
      when(s.started_at),
      lengthOf(s),
      s.status === 'open' ? h('strong', {}, 'live now') : s.status,
      keyMetrics(metrics[i]),
    ]);
    return h('section', { 'aria-label': heading },
      h('h2', {}, heading),
      rows.length
        ? table(`Recent sessions of ${person.relationship === 'self' ? 'yours' : person.first_name || 'this person'}`,
          ['Exercise', 'Started', 'Length', 'Status', 'Key metrics'], rows)
        : h('p', {}, 'No sessions yet.'));
  });
  const greeting = state.me.first_name ? `Hello, ${state.me.first_name}` : 'Your sessions';
  view.render(greeting, ...sections.filter(Boolean));
}

// ------------------------------------------------------------------------------------------
// A session: metrics, plots, the live feed of an open one, its export

function metricRows(metrics, names) {
  return names.map((name) => {
    const m = metrics.find((x) => x.metric === name && x.channel === 0);
    if (!m) return null;
    const [label, unit, digits] = METRICS[name];
    return [label, `${num(m.value, digits)} ${unit}`];
  }).filter(Boolean);
}

function bandTable(metrics, channelNames) {
  const channels = [...new Set(metrics.filter((m) => BANDS.includes(m.metric)).map((m) => m.channel))].sort((a, b) => a - b);
  if (!channels.length) return null;
  const max = Math.max(...metrics.filter((m) => BANDS.includes(m.metric)).map((m) => m.value), 1e-9);
  const rows = channels.map((c) => [channelNames[c] || `channel ${c + 1}`].concat(BANDS.map((band) => {
    const m = metrics.find((x) => x.metric === band && x.channel === c);
    if (!m) return '—';
    return h('span', { class: 'bar' },
      h('meter', { min: 0, max, value: m.value, 'aria-hidden': 'true' }),
      ` ${num(m.value, 2)}`);
  })));
  return table('EEG band power per channel (µV²)', ['Channel', 'Delta 1–4 Hz', 'Theta 4–8 Hz', 'Alpha 8–13 Hz', 'Beta 13–30 Hz'], rows);
}

function metricsSection(session, metrics) {
  if (session.status !== 'completed') return null;
  if (!metrics || !metrics.computed_at) {
    return h('section', {}, h('h2', {}, 'Metrics'), h('p', {}, 'The metrics are being computed; reload in a minute.'));
  }
  const hrv = metricRows(metrics.metrics, ['mean_hr_bpm', 'rmssd_ms', 'sdnn_ms', 'pnn50_pct', 'hrv_coherence_ratio', 'mean_rr_ms']);
  const spo2 = metricRows(metrics.metrics, ['spo2_mean_pct', 'spo2_min_pct', 'spo2_below_90_s']);
  const eeg = state.catalog.get('eeg');
  return h('section', { class: 'metrics' },
    h('h2', {}, 'Metrics'),
    hrv.length ? table('Heart-rate variability', ['Metric', 'Value'], hrv) : null,
    spo2.length ? table('Pulse oximetry', ['Metric', 'Value'], spo2) : null,
    bandTable(metrics.metrics, eeg ? eeg.channel_names : []));
}

function exportLinks(session) {
  if (session.status !== 'completed') return null;
  const types = session.data_types;
  const continuous = types.some((t) => state.catalog.get(t)?.sample_rate_hz);
  const formats = [['csv', 'CSV (one file per signal, zipped)']];
  if (continuous) formats.push(['edf', 'EDF+ (for EEG and clinical tools)']);
  if (types.includes('rr_interval')) formats.push(['rr', 'RR intervals (for Kubios and HRV tools)']);
  if (types.includes('eeg')) formats.push(['bids', 'BIDS-EEG (zipped)']);
  return h('section', {},
    h('h2', {}, 'Export'),
    h('ul', {}, formats.map(([format, label]) => h('li', {},
      h('a', { href: `/v1/sessions/${session.session_id}/export?format=${format}`, download: '' }, label)))));
}

function spo2Extra() {
  return {
    series: [{ label: 'below 90 %', stroke: '#b3261e', width: 2, points: { show: false } }],
    values: (t, values) => [values.map((v) => (v !== null && v < 90 ? v : null))],
  };
}

async function sessionPage(view, id) {
  const session = await get(`/v1/sessions/${id}`);
  const metrics = session.status === 'completed' ? await get(`/v1/sessions/${id}/metrics`) : null;
  // Left meanwhile: open no live feed and draw no plot for a page nobody looks at.
  if (!view.alive()) throw new Stale();
  const whose = session.user_id === state.me.user_id ? '' : ` — ${personName(session.user_id)}`;
  const spanUs = ((session.ended_at ? new Date(session.ended_at) : new Date()) - new Date(session.started_at)) * 1000;
  const types = [...session.data_types].sort((a, b) => PLOT_ORDER.indexOf(a) - PLOT_ORDER.indexOf(b));
  const facts = [
    ['Status', session.status === 'open' ? 'recording now' : session.status],
    ['Started', when(session.started_at)],
    ['Length', lengthOf(session)],
    ['Signals', types.join(', ')],
  ];
  if (session.feedback && typeof session.feedback === 'object') {
    for (const [key, value] of Object.entries(session.feedback)) facts.push([`Feedback: ${key}`, typeof value === 'string' ? value : JSON.stringify(value)]);
  }
  const details = h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
  const liveBox = session.status === 'open' ? liveSection(view, session) : null;
  const figures = session.status === 'purged' ? [] : types.map((name) => {
    const dataType = state.catalog.get(name);
    if (!dataType) return null;
    const title = name === 'rr_interval' ? 'RR tachogram' : dataType.description;
    return signalFigure(view, session, dataType, { spanUs, title, extra: name === 'spo2' ? spo2Extra() : undefined });
  }).filter(Boolean);
  view.render(`${exerciseName(session.exercise)}, ${day(session.started_at)}${whose}`,
    details,
    liveBox,
    metricsSection(session, metrics),
    figures.length ? h('section', { 'aria-label': 'Signals' }, h('h2', {}, 'Signals'), figures) : null,
    exportLinks(session));
  await Promise.all(figures.map((f) => f.ready));
  if (view.alive()) main.dataset.ready = id; // this session's plots are drawn
}

function liveSection(view, session) {
  const status = h('p', { class: 'live-status', role: 'status' }, 'Connecting to the live feed…');
  const boxes = new Map();
  const holder = h('div', { class: 'live-feeds' });
  const section = h('section', { class: 'live', 'aria-label': 'Live feedback' }, h('h2', {}, 'Live'), status, holder);
  const source = new EventSource(`/v1/sessions/${session.session_id}/live`);
  view.onLeave(() => source.close());
  source.addEventListener('open', () => { status.textContent = 'Live: updated every second while samples arrive.'; });
  source.addEventListener('feed', (event) => {
    const feed = JSON.parse(event.data);
    let box = boxes.get(feed.data_type);
    if (!box) {
      const dataType = state.catalog.get(feed.data_type);
      const list = h('dl', { class: 'facts' });
      const plotHolder = h('div', {});
      const el = h('div', { class: 'live-feed', 'data-data-type': feed.data_type }, h('h3', {}, dataType?.description || feed.data_type), list, plotHolder);
      holder.appendChild(el);
      box = { el, list, plot: linePlot(view, plotHolder, { label: dataType?.channel_names[0] || feed.data_type, unit: dataType?.unit || '', points: false, height: 160 }) };
      boxes.set(feed.data_type, box);
    }
    const rows = feed.metrics.map((m) => {
      const [label, unit, digits] = METRICS[m.name] || [m.name, '', 2];
      const channel = feed.channels > 1 ? ` (channel ${m.channel + 1})` : '';
      return [h('dt', {}, `${label}${channel}`), h('dd', {}, `${num(m.value, digits)} ${unit}`)];
    });
    rows.push([h('dt', {}, 'Samples in the window'), h('dd', {}, String(feed.samples))]);
    replace(box.list, rows);
    box.el.dataset.through = String(feed.through_us);
    box.plot.set(feed.plot.t_us.map((t) => t / 1e6), feed.plot.values[0] || []);
  });
  source.addEventListener('end', (event) => {
    const { reason } = JSON.parse(event.data);
    const why = {
      session_closed: 'The session has ended.',
      access_ended: 'You may no longer see this session.',
      logged_out: 'Your login has ended.',
      unavailable: 'The live feed stopped; reload to try again.',
    }[reason] || 'The live feed stopped.';
    status.textContent = why;
    source.close();
  });
  source.addEventListener('error', () => {
    if (source.readyState === EventSource.CLOSED) status.textContent = 'The live feed is not available for this session.';
    else status.textContent = 'Reconnecting to the live feed…';
  });
  return section;
}

// ------------------------------------------------------------------------------------------
// Trends: a metric across a person's sessions

async function trendsPage(view) {
  state.people = await get('/v1/me/people');
  const chart = h('div', { class: 'trend' });
  const listing = h('div', {});
  const personOptions = state.people.map((p) => [p.user_id, p.relationship === 'self' ? 'You' : p.first_name || p.user_id]);
  const metricOptions = Object.entries(METRICS).map(([name, [label, unit]]) => [name, `${label} (${unit})`]);
  let plot = null;
  const show = async ({ person, metric, weeks }) => {
    const since = new Date(Date.now() - Number(weeks) * 7 * 86400e3).toISOString();
    const points = await get(`/v1/users/${person}/trend?metric=${metric}&since=${encodeURIComponent(since)}`);
    const [label, unit, digits] = METRICS[metric];
    if (!plot) plot = linePlot(view, chart, { label, unit });
    plot.set(points.map((p) => new Date(p.started_at).getTime() / 1000), points.map((p) => p.value));
    replace(listing, points.length
      ? table(`${label} per session`, ['Session', 'Exercise', label], points.map((p) => [
        h('a', { href: `#/sessions/${p.session_id}` }, when(p.started_at)), exerciseName(p.exercise), `${num(p.value, digits)} ${unit}`]))
      : h('p', {}, 'No completed session of this person has this metric in that time.'));
  };
  view.render('Trends',
    form('Choose a trend', [
      field('Whose', { name: 'person', options: personOptions }),
      field('Metric', { name: 'metric', options: metricOptions, value: 'rmssd_ms' }),
      field('Weeks back', { type: 'number', name: 'weeks', min: 1, max: 520, value: '12' }),
    ], 'Show', show),
    chart, listing);
  await show({ person: state.me.user_id, metric: 'rmssd_ms', weeks: 12 });
}

// ------------------------------------------------------------------------------------------
// Relationships and consent

async function peoplePage(view) {
  const me = state.me.user_id;
  const all = await get('/v1/relationships');
  const minor = state.people.find((p) => p.user_id === me)?.minor;
  const status = (r) => (r.revoked_at ? `ended ${day(r.revoked_at)}` : r.consented_at ? `accepted ${day(r.consented_at)}` : 'waiting for acceptance');
  const act = (label, path, done) => postButton(label, path, done, async () => {
    await loadMe();
    await peoplePage(view);
  });
  const care = (kind) => kind === 'practitioner_patient' || kind === 'coach_athlete';
  const rows = all.map((r) => {
    const [leadName, followerName] = RELATIONSHIPS[r.relationship_type] || ['lead', 'follower'];
    const iLead = r.lead_id === me;
    const mine = iLead || r.follower_id === me;
    // Not one's own: a minor ward's care relationship, which their guardian decides.
    const other = iLead ? r.follower_id : r.lead_id;
    const role = !mine ? `${personName(r.follower_id)}'s ${leadName} (you decide as their guardian)`
      : iLead ? `your ${followerName}` : `your ${leadName}`;
    const actions = [];
    const pending = !r.consented_at && !r.revoked_at;
    const guardianDecides = minor && !iLead && care(r.relationship_type);
    if (pending && r.invited_by !== me && !guardianDecides) actions.push(act('Accept', `/v1/relationships/${r.id}/accept`, 'Accepted.'));
    if (pending && guardianDecides) actions.push('your parent or guardian decides');
    if (!r.revoked_at) actions.push(act(r.consented_at ? 'Revoke' : 'Decline', `/v1/relationships/${r.id}/revoke`, 'Ended: nothing more is shared through it.'));
    return [personName(other), h('code', {}, other), role, status(r), actions];
  });
  const kinds = [];
  for (const [kind, [lead, follower]] of Object.entries(RELATIONSHIPS)) {
    kinds.push([`follower:${kind}`, `my ${follower} (I am their ${lead})`]);
    kinds.push([`lead:${kind}`, `my ${lead} (I am their ${follower})`]);
  }
  view.render('People',
    h('p', {}, 'Your id, for others to invite you: ', h('code', { class: 'id' }, me), ' ', copyButton(me, 'Id')),
    minor ? h('p', { class: 'note' },
      'You are under the age of consent where you live: a practitioner or coach can see your data only once your parent or guardian has accepted their invitation. A parent or guardian you invite must accept too.') : null,
    h('section', {}, h('h2', {}, 'Invite someone'),
      form('Invite someone', [
        field('Their id', { name: 'other', required: true, pattern: '[0-9a-fA-F-]{36}' }, 'They find it on their People page.'),
        field('They are', { name: 'kind', options: kinds }),
      ], 'Send invitation', async ({ other, kind }) => {
        const [side, type] = kind.split(':');
        await post('/v1/relationships', side === 'follower' ? { type, follower_id: other.trim() } : { type, lead_id: other.trim() });
        announce('Invitation sent: nothing is shared until it is accepted.');
        await peoplePage(view);
      })),
    h('section', {}, h('h2', {}, 'Your relationships'),
      rows.length ? table('Relationships, newest first', ['Who', 'Id', 'Is', 'Status', 'Actions'], rows) : h('p', {}, 'None yet.')));
}

// ------------------------------------------------------------------------------------------
// Devices

async function devicesPage(view, created) {
  const devices = await get('/v1/me/devices');
  const tokenBox = created ? h('section', { class: 'note', 'aria-label': 'New device token' },
    h('h2', {}, 'Your new device token'),
    h('p', {}, 'Copy it into the device now: it is shown only once.'),
    field('Device token', { readonly: true, value: created.token, name: 'token' }),
    copyButton(created.token, 'Token')) : null;
  const rows = devices.map((d) => [
    d.model, h('code', {}, d.id), when(d.created_at), when(d.last_seen_at),
    d.revoked_at ? `revoked ${day(d.revoked_at)}`
      : postButton(`Revoke ${d.model}`, `/v1/me/devices/${d.id}/revoke`,
        `${d.model} revoked: it can no longer record.`, () => devicesPage(view)),
  ]);
  view.render('Devices',
    tokenBox,
    h('section', {}, h('h2', {}, 'Register a device'),
      form('Register a device', [field('Model', { name: 'model', required: true, maxlength: 200 })], 'Register', async ({ model }) => {
        const registered = await post('/v1/me/devices', { model });
        await devicesPage(view, registered);
      })),
    h('section', {}, h('h2', {}, 'Your devices'),
      rows.length ? table('Your devices', ['Model', 'Id', 'Registered', 'Last seen', 'Status'], rows) : h('p', {}, 'None yet.')));
}

// ------------------------------------------------------------------------------------------
// Who saw my data

async function accessLogPage(view) {
  const holder = h('div', {});
  const more = h('button', { type: 'button', hidden: true }, 'Older entries');
  let before = null;
  const rows = [];
  const load = async () => {
    const page = await get(`/v1/users/${state.me.user_id}/access-log?limit=50${before ? `&before=${before}` : ''}`);
    for (const r of page) {
      rows.push([when(r.at), r.actor_id ? `${personName(r.actor_id)}${r.actor_role ? ` (${r.actor_role})` : ''}` : 'an operator',
        r.action, r.resource, r.allowed ? 'allowed' : 'refused']);
    }
    before = page.length ? page[page.length - 1].id : before;
    more.hidden = page.length < 50;
    replace(holder, rows.length ? table('Reads and attempts, newest first', ['When', 'Who', 'Did', 'What', 'Outcome'], rows) : h('p', {}, 'Nobody has read your data yet.'));
  };
  more.addEventListener('click', () => load().catch((e) => announce(e.message, 'error')));
  await load();
  view.render('Who saw my data', h('p', {}, 'Every read of your data by anyone, and every refused attempt.'), holder, more);
}

// ------------------------------------------------------------------------------------------
// Account: export and erasure

async function accountPage(view) {
  const me = state.me;
  const facts = [['Email', me.email], ['First name', me.first_name || '—'], ['Role', me.role],
    ['Date of birth', me.birth_date || '—'], ['Country', me.country || '—'], ['Time zone of this page', Intl.DateTimeFormat().resolvedOptions().timeZone]];
  view.render('Account',
    h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
    h('section', {}, h('h2', {}, 'Your data'),
      h('ul', {},
        h('li', {}, h('a', { href: '/v1/me/export', download: 'biofeed-export.ndjson' }, 'Download everything biofeed holds about you (JSON lines)')),
        h('li', {}, h('a', { href: `/v1/users/${me.user_id}/export?format=csv`, download: '' }, 'Download all your completed sessions as CSV (zip)')))),
    h('section', { class: 'danger-zone' }, h('h2', {}, 'Erase your account'),
      h('p', {}, 'This deletes your profile, your devices, your relationships and every session you recorded, for good. It cannot be undone. Download your data first if you want to keep it.'),
      form('Erase your account', [
        field('Your password', { type: 'password', name: 'password', required: true, autocomplete: 'current-password' }),
        h('div', { class: 'field check' },
          h('input', { type: 'checkbox', id: 'understand', name: 'understand', required: true }),
          h('label', { for: 'understand' }, 'I understand that my account and all my data will be erased for good')),
      ], 'Erase my account', async ({ password, understand }) => {
        if (!understand) throw new Error('Tick the box to confirm that you understand.');
        await api('DELETE', '/v1/me', { password });
        state.me = null;
        renderNav('');
        location.hash = '#/login';
        announce('Your account and your data have been erased.');
      }, { danger: true })));
}

// ------------------------------------------------------------------------------------------

document.getElementById('tz').textContent = `Times are shown in ${Intl.DateTimeFormat().resolvedOptions().timeZone}.`;
// The skip link moves the focus; it never changes the route.
document.querySelector('.skip').addEventListener('click', (event) => {
  event.preventDefault();
  main.focus();
});
window.addEventListener('hashchange', route);
route();
