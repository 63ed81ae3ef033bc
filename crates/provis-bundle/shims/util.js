// provis shim for Node's `util`: the pure parts (format, inspect as JSON,
// inherits, deprecate, promisify, isDeepStrictEqual). Nothing that reaches
// the machine.
'use strict';

function inspect(value) {
  if (typeof value === 'string') return "'" + value + "'";
  if (typeof value === 'function') return '[Function: ' + (value.name || 'anonymous') + ']';
  if (value instanceof Error) return value.stack || String(value);
  try {
    const text = JSON.stringify(value);
    return text === undefined ? String(value) : text;
  } catch (err) {
    return String(value);
  }
}

function format(first, ...args) {
  if (typeof first !== 'string') return [first, ...args].map(inspect).join(' ');
  let used = 0;
  const text = first.replace(/%[sdifjoO%]/g, (token) => {
    if (token === '%%') return '%';
    if (used >= args.length) return token;
    const value = args[used++];
    switch (token) {
      case '%s': return typeof value === 'string' ? value : inspect(value);
      case '%d': return String(Number(value));
      case '%i': return String(parseInt(value, 10));
      case '%f': return String(parseFloat(value));
      default: return inspect(value);
    }
  });
  return [text, ...args.slice(used).map((v) => (typeof v === 'string' ? v : inspect(v)))].join(' ');
}

function inherits(ctor, superCtor) {
  Object.setPrototypeOf(ctor.prototype, superCtor.prototype);
  Object.setPrototypeOf(ctor, superCtor);
  ctor.super_ = superCtor;
}

function deprecate(fn) {
  return fn;
}

function promisify(fn) {
  return (...args) => new Promise((resolve, reject) => {
    fn(...args, (err, value) => (err ? reject(err) : resolve(value)));
  });
}

function isDeepStrictEqual(a, b) {
  if (Object.is(a, b)) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (Object.getPrototypeOf(a) !== Object.getPrototypeOf(b)) return false;
  const keys = Object.keys(a);
  if (keys.length !== Object.keys(b).length) return false;
  return keys.every((key) => Object.prototype.hasOwnProperty.call(b, key) && isDeepStrictEqual(a[key], b[key]));
}

module.exports = { format, inspect, inherits, deprecate, promisify, isDeepStrictEqual };
