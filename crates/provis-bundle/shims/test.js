// `provis:test`, the assertion API of `provis service test`: register tests
// with test(name, fn); fn may be async. The runner calls __provisRunTests.
const registered = [];

export function test(name, fn) {
  if (typeof name !== 'string' || typeof fn !== 'function') {
    throw new TypeError('test(name, fn): a name and a function');
  }
  registered.push({ name, fn });
}

export class AssertionError extends Error {
  constructor(message) {
    super(message);
    this.name = 'AssertionError';
  }
}

function show(value) {
  try {
    const text = JSON.stringify(value);
    return text === undefined ? String(value) : text;
  } catch (err) {
    return String(value);
  }
}

function deepEqual(a, b) {
  if (Object.is(a, b)) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const keys = Object.keys(a);
  if (keys.length !== Object.keys(b).length) return false;
  return keys.every((key) => Object.prototype.hasOwnProperty.call(b, key) && deepEqual(a[key], b[key]));
}

export const assert = {
  ok(value, message) {
    if (!value) throw new AssertionError(message || 'expected a truthy value, got ' + show(value));
  },
  equal(actual, expected, message) {
    if (!Object.is(actual, expected)) {
      throw new AssertionError(message || 'expected ' + show(expected) + ', got ' + show(actual));
    }
  },
  notEqual(actual, expected, message) {
    if (Object.is(actual, expected)) {
      throw new AssertionError(message || 'expected anything but ' + show(expected));
    }
  },
  deepEqual(actual, expected, message) {
    if (!deepEqual(actual, expected)) {
      throw new AssertionError(message || 'expected ' + show(expected) + ', got ' + show(actual));
    }
  },
  throws(fn, pattern, message) {
    try {
      fn();
    } catch (err) {
      if (pattern && !pattern.test(String(err && err.message))) {
        throw new AssertionError(message || 'threw ' + show(String(err)) + ', not matching ' + pattern);
      }
      return err;
    }
    throw new AssertionError(message || 'expected the function to throw');
  },
  async rejects(promiseOrFn, pattern, message) {
    try {
      await (typeof promiseOrFn === 'function' ? promiseOrFn() : promiseOrFn);
    } catch (err) {
      if (pattern && !pattern.test(String(err && err.message))) {
        throw new AssertionError(message || 'rejected with ' + show(String(err)) + ', not matching ' + pattern);
      }
      return err;
    }
    throw new AssertionError(message || 'expected a rejection');
  },
  fail(message) {
    throw new AssertionError(message || 'failed');
  },
};

/** Runs every registered test in order; one result each. */
export async function __provisRunTests() {
  const results = [];
  for (const { name, fn } of registered) {
    const started = Date.now();
    try {
      await fn();
      results.push({ name, ok: true, ms: Date.now() - started });
    } catch (err) {
      results.push({
        name,
        ok: false,
        ms: Date.now() - started,
        error: err && err.name ? err.name + ': ' + err.message : String(err),
        stack: (err && err.stack) || '',
      });
    }
  }
  return results;
}
