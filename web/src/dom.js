// Building the page: every string becomes a text node, never HTML (no innerHTML anywhere in the
// app), so a name like `<img src=x onerror=…>` shows as those characters.

/**
 * An element: `h('a', { href: '#/x', class: 'c', on: { click: f } }, 'text', child, …)`.
 * Attributes are set with setAttribute; children are nodes, strings (text), arrays, or null.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'on') {
      for (const [event, handler] of Object.entries(value)) el.addEventListener(event, handler);
    } else if (key === 'class') {
      el.className = value;
    } else if (key === 'value') {
      el.value = value;
    } else if (key === 'checked') {
      el.checked = Boolean(value);
    } else if (key.startsWith('on') || key === 'style' || key === 'innerHTML') {
      throw new Error(`h(): ${key} is not set this way`);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replaces an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let fieldIds = 0;

/** A labelled form field: `field('Email', { type: 'email', name: 'email', required: true })`. */
export function field(label, props = {}, hint) {
  const id = `f${++fieldIds}`;
  const hintId = hint ? `${id}-hint` : undefined;
  const control = props.options
    ? h('select', { id, name: props.name, required: props.required },
        props.options.map(([value, text]) => h('option', { value, selected: value === props.value }, text)))
    : h('input', { id, 'aria-describedby': hintId, ...props });
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    control,
    hint ? h('small', { id: hintId, class: 'hint' }, hint) : null);
}

/** A table with a caption, header cells and rows of cells (nodes or text). */
export function table(caption, headers, rows) {
  return h('div', { class: 'table-wrap' },
    h('table', {},
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col' }, x)))),
      h('tbody', {}, rows.map((row) => h('tr', {}, row.map((cell) => h('td', {}, cell)))))));
}

/** Says something to the person (and to screen readers, through the live region). */
let announced = null;
export function announce(message, kind = 'info') {
  const status = document.getElementById('status');
  status.className = `status ${kind}`;
  status.textContent = message;
  clearTimeout(announced);
  announced = setTimeout(() => { status.textContent = ''; }, kind === 'error' ? 12000 : 6000);
}

/** An exercise's name for people: `hrv_biofeedback` → `HRV biofeedback`. */
export function exerciseName(name) {
  const words = name.replace(/_/g, ' ').replace(/\b(hrv|eeg|ecg|spo2)\b/gi, (w) => w.toUpperCase());
  return words.charAt(0).toUpperCase() + words.slice(1);
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
const dateOnly = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium' });

/** A time in the person's own time zone (the browser's). */
export function when(iso) {
  return iso ? dateTime.format(new Date(iso)) : '—';
}

/** A date in the person's own time zone. */
export function day(iso) {
  return iso ? dateOnly.format(new Date(iso)) : '—';
}

/** A length of time: `1 h 05 min`, `12 min 30 s`, `45 s`. */
export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '—';
  const s = Math.round(seconds);
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  if (hours) return `${hours} h ${String(minutes).padStart(2, '0')} min`;
  if (minutes) return `${minutes} min ${String(rest).padStart(2, '0')} s`;
  return `${rest} s`;
}

/** A number with at most `digits` decimals, in the person's locale. */
export function num(value, digits = 1) {
  return Number.isFinite(value)
    ? value.toLocaleString(undefined, { maximumFractionDigits: digits })
    : '—';
}
