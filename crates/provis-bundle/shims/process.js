// provis shim for Node's `process`, given to CommonJS modules that read the
// free name `process`: an empty environment (NODE_ENV=production), and
// nextTick on the microtask queue. No argv, exit, cwd or binding.
'use strict';

module.exports = {
  env: { NODE_ENV: 'production' },
  platform: 'provis',
  version: '',
  versions: {},
  argv: [],
  nextTick(fn, ...args) {
    Promise.resolve().then(() => fn(...args));
  },
};
