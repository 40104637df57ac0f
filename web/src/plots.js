// Plots, with uPlot (made for large time series): zoom by dragging across a plot or with the
// buttons, pan with the buttons or the arrow keys, hover for values. The points come from the
// API already downsampled (`step`) to about as many as the plot is wide: a one-hour 256 Hz EEG
// session ships ~1500 bucket means per channel, never its 900 000 raw samples.

import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import './app.css';
import { get } from './api.js';
import { h, num, replace, when } from './dom.js';

/** About how many points a plot asks for across its width. */
const TARGET_POINTS = 1500;
/** Raw samples are fetched when a view holds fewer than this. */
const RAW_LIMIT = 3000;
/** Pages of points one view may fetch. */
const MAX_PAGES = 10;
const COLOURS = ['#0b5cad', '#b3261e', '#1b7f3b', '#7a4eab', '#a65b00', '#00707a', '#8a3a66', '#4d5b00'];

/** The step (µs) a view of `span_us` of a data type is read with, or null for raw samples. */
export function stepFor(spanUs, sampleRateHz) {
  const rate = sampleRateHz || 2; // event streams (RR intervals): about two a second at most
  if ((spanUs / 1e6) * rate <= RAW_LIMIT) return null;
  return Math.max(1000, Math.ceil(spanUs / TARGET_POINTS / 1000) * 1000);
}

/**
 * A session's points of one data type between `fromUs` and `toUs` (either may be null): time in
 * seconds and one array per channel (bucket means when downsampled).
 */
export async function fetchPoints(sessionId, dataType, fromUs, toUs, spanUs) {
  const stepUs = stepFor(spanUs, dataType.sample_rate_hz);
  const params = new URLSearchParams({ data_type: dataType.name });
  if (fromUs !== null) params.set('from', String(Math.floor(fromUs)));
  if (toUs !== null) params.set('to', String(Math.ceil(toUs)));
  if (stepUs) params.set('step', `${stepUs / 1000}ms`);
  const t = [];
  const channels = Array.from({ length: dataType.channels }, () => []);
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const answer = await get(`/v1/sessions/${sessionId}/points?${params}`);
    const rows = answer.buckets || answer.samples || [];
    for (const row of rows) {
      t.push(row.t_us / 1e6);
      const values = row.mean || row.values;
      for (let c = 0; c < channels.length; c += 1) channels[c].push(values[c] ?? null);
    }
    if (answer.next_from === null || answer.next_from === undefined) break;
    params.set('from', String(answer.next_from));
  }
  return { t, channels, stepUs };
}

function sizeOf(container, height) {
  const width = Math.max(280, Math.floor(container.getBoundingClientRect().width || 600));
  return { width, height };
}

function describe(label, unit, t, values) {
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  if (!finite.length) return `${label}: no samples in view`;
  const min = Math.min(...finite.slice(0, 100000));
  const max = Math.max(...finite.slice(0, 100000));
  return `${label}: ${finite.length} points from ${when(t[0] * 1000)} to ${when(t[t.length - 1] * 1000)}, `
    + `between ${num(min, 2)} and ${num(max, 2)} ${unit}`;
}

/**
 * A zoomable plot of a data type of a session: one plot with a series per channel, or, for many
 * channels (EEG), one stacked plot per channel sharing the cursor and the zoom. `extra` may add
 * derived series: `{ series: [uPlot series options], values: (t, values) => [arrays] }` (e.g.
 * SpO2 below 90 %).
 */
export function signalFigure(view, session, dataType, { spanUs, title, extra } = {}) {
  const stacked = dataType.channels > 2;
  const names = dataType.channel_names.length === dataType.channels
    ? dataType.channel_names
    : Array.from({ length: dataType.channels }, (_, c) => dataType.channel_names[c] || `channel ${c + 1}`);
  const holder = h('div', { class: 'plots' });
  const summary = h('p', { class: 'plot-summary' });
  const figure = h('figure', { class: 'signal', 'data-data-type': dataType.name },
    h('figcaption', {}, h('h3', {}, title || dataType.description), summary),
    holder);
  const plots = [];
  let full = null; // the whole session's x range, for Reset
  let loading = 0;
  let settled = false; // the plots are made: a change of scale from now on is the person's
  let left = false; // the page was left: nothing more is loaded or drawn
  let shown = null; // the x range (s) the data on screen was read for; null: the whole session
  const syncKey = `sync-${dataType.name}-${Math.random().toString(36).slice(2)}`;

  async function load(fromUs, toUs, span) {
    if (left) return;
    const ticket = ++loading;
    figure.setAttribute('aria-busy', 'true');
    try {
      const data = await fetchPoints(session.session_id, dataType, fromUs, toUs, span);
      if (ticket !== loading || left) return;
      draw(data);
      figure.dataset.from = fromUs === null ? '' : String(fromUs);
      figure.dataset.to = toUs === null ? '' : String(toUs);
    } finally {
      if (ticket === loading) figure.removeAttribute('aria-busy');
    }
  }

  function rowsFor(data, channels) {
    const rows = [data.t, ...channels.map((c) => data.channels[c])];
    if (extra) rows.push(...extra.values(data.t, data.channels[channels[0]]));
    return rows;
  }

  function draw(data) {
    if (left) return;
    figure.dataset.points = String(data.t.length);
    figure.dataset.step = data.stepUs ? String(data.stepUs) : 'raw';
    const groups = stacked ? names.map((_, c) => [c]) : [names.map((_, c) => c)];
    if (!plots.length) {
      if (!data.t.length) {
        replace(holder, h('p', {}, 'No samples of this kind were stored.'));
        return;
      }
      full = [data.t[0], data.t[data.t.length - 1]];
      groups.forEach((channels) => {
        const box = h('div', { class: stacked ? 'plot stacked' : 'plot', role: 'img' });
        holder.appendChild(box);
        const series = [{}].concat(channels.map((c) => ({
          label: `${names[c]} (${dataType.unit})`,
          stroke: COLOURS[c % COLOURS.length],
          width: 1.25,
          points: { show: !data.stepUs && dataType.sample_rate_hz === null },
        })));
        if (extra) series.push(...extra.series);
        const rows = rowsFor(data, channels);
        const u = new uPlot({
          ...sizeOf(holder, stacked ? (channels[0] === names.length - 1 ? 130 : 90) : 240),
          cursor: {
            sync: { key: syncKey, setSeries: false },
            drag: { x: true, y: false },
            // A double-click shows the whole session again, not just what was loaded for the view.
            bind: { dblclick: () => () => { setRange(full[0], full[1]); return null; } },
          },
          scales: { x: { time: true } },
          legend: { live: true },
          // Stacked channels share one time axis, under the last of them.
          axes: [{ show: !stacked || channels[0] === names.length - 1 }, { label: stacked ? names[channels[0]] : dataType.unit, size: 60 }],
          series,
          hooks: {
            setScale: [(plot, key) => {
              if (key !== 'x' || plot.__syncing || !settled) return;
              const { min, max } = plot.scales.x;
              plots.forEach(({ u: other }) => {
                if (other !== plot) {
                  other.__syncing = true;
                  other.setScale('x', { min, max });
                  other.__syncing = false;
                }
              });
              zoomed(min, max);
            }],
          },
        }, rows, box);
        box.uplot = u;
        box.setAttribute('aria-label', describe(names[channels[0]], dataType.unit, data.t, data.channels[channels[0]]));
        plots.push({ u, channels, box });
      });
      settled = true;
    } else {
      plots.forEach(({ u, channels, box }) => {
        // New data for the same view: setScale makes uPlot find what is in view and draw it
        // (setData without resetting the scales draws nothing by itself); `shown` keeps the
        // scale hook from reading the same view again.
        const { min, max } = u.scales.x;
        u.setData(rowsFor(data, channels), false);
        u.setScale('x', { min, max });
        box.setAttribute('aria-label', describe(names[channels[0]], dataType.unit, data.t, data.channels[channels[0]]));
      });
    }
    const step = data.stepUs ? `means of ${num(data.stepUs / 1000, 0)} ms` : 'every sample';
    summary.textContent = `${data.t.length} points shown (${step}). Drag across a plot to zoom; double-click resets.`;
  }

  let timer = null;
  const same = (a, b) => Math.abs(a - b) < 1e-6;
  function zoomed(min, max) {
    if (left) return;
    const whole = same(min, full[0]) && same(max, full[1]);
    // The view on screen already has its data (the first drawing, or a drawing of new data).
    if (whole ? shown === null : shown && same(min, shown[0]) && same(max, shown[1])) return;
    shown = whole ? null : [min, max];
    figure.dataset.view = whole ? 'whole' : 'zoomed';
    clearTimeout(timer);
    timer = setTimeout(() => {
      // The whole session is read as at first; a view up to and including its last instant.
      const read = whole ? load(null, null, spanUs) : load(Math.floor(min * 1e6), Math.ceil(max * 1e6) + 1, (max - min) * 1e6);
      read.catch(() => {});
    }, 200);
  }

  function setRange(min, max) {
    if (!plots.length) return;
    plots[0].u.setScale('x', { min, max });
  }

  function current() {
    const { min, max } = plots[0].u.scales.x;
    return [min, max];
  }

  const button = (label, action, text) => h('button', {
    type: 'button', 'aria-label': label, on: { click: () => plots.length && action() },
  }, text);
  const controls = h('div', { class: 'plot-controls', role: 'group', 'aria-label': `${dataType.name} view` },
    button('Zoom in', () => { const [a, b] = current(); const q = (b - a) / 4; setRange(a + q, b - q); }, '+ Zoom in'),
    button('Zoom out', () => { const [a, b] = current(); const q = (b - a) / 2; setRange(Math.max(full[0], a - q), Math.min(full[1], b + q)); }, '− Zoom out'),
    button('Pan earlier', () => { const [a, b] = current(); const q = (b - a) / 2; setRange(a - q, b - q); }, '◀ Earlier'),
    button('Pan later', () => { const [a, b] = current(); const q = (b - a) / 2; setRange(a + q, b + q); }, 'Later ▶'),
    button('Show the whole session', () => setRange(full[0], full[1]), 'Whole session'));
  figure.insertBefore(controls, holder);
  figure.addEventListener('keydown', (event) => {
    if (!plots.length || event.target.closest('button')) return;
    if (event.key === 'ArrowLeft' || event.key === 'ArrowRight') {
      const [a, b] = current();
      const q = ((b - a) / 4) * (event.key === 'ArrowLeft' ? -1 : 1);
      setRange(a + q, b + q);
      event.preventDefault();
    }
  });
  figure.setAttribute('tabindex', '0');

  const resize = () => plots.forEach(({ u }) => u.setSize(sizeOf(holder, u.height)));
  window.addEventListener('resize', resize);
  view.onLeave(() => {
    left = true;
    window.removeEventListener('resize', resize);
    clearTimeout(timer);
    loading += 1; // an answer still on its way is dropped
    plots.forEach(({ u }) => u.destroy());
    plots.length = 0; // the buttons and keys find nothing to move
  });
  figure.ready = load(null, null, spanUs).catch((error) => {
    replace(holder, h('p', { class: 'error' }, `Could not load the samples: ${error.message}`));
  });
  return figure;
}

/** A simple plot of values over time (trends, live feeds): `t` in seconds. */
export function linePlot(view, container, { label, unit, points = true, height = 220 }) {
  const box = h('div', { class: 'plot', role: 'img', 'aria-label': `${label}: no data yet` });
  container.appendChild(box);
  const u = new uPlot({
    ...sizeOf(container, height),
    scales: { x: { time: true } },
    axes: [{}, { label: unit, size: 60 }],
    series: [{}, { label: `${label} (${unit})`, stroke: COLOURS[0], width: 1.5, points: { show: points } }],
  }, [[], []], box);
  box.uplot = u;
  const resize = () => u.setSize(sizeOf(container, height));
  window.addEventListener('resize', resize);
  view.onLeave(() => {
    window.removeEventListener('resize', resize);
    u.destroy();
  });
  return {
    set(t, values) {
      u.setData([t, values]);
      box.setAttribute('aria-label', describe(label, unit, t, values));
    },
    box,
  };
}
