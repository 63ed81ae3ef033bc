// provis shim for Node's `events`: EventEmitter in pure JavaScript, enough
// for packages that emit and listen; no captureRejections, no async helpers.
'use strict';

function EventEmitter() {
  this._events = Object.create(null);
  this._maxListeners = undefined;
}

function listenersOf(emitter, type) {
  if (!emitter._events) emitter._events = Object.create(null);
  return emitter._events[type] || (emitter._events[type] = []);
}

EventEmitter.prototype.on = function on(type, listener) {
  if (typeof listener !== 'function') throw new TypeError('listener must be a function');
  if (this._events && this._events.newListener) this.emit('newListener', type, listener);
  listenersOf(this, type).push(listener);
  return this;
};
EventEmitter.prototype.addListener = EventEmitter.prototype.on;

EventEmitter.prototype.prependListener = function prependListener(type, listener) {
  listenersOf(this, type).unshift(listener);
  return this;
};

EventEmitter.prototype.once = function once(type, listener) {
  const emitter = this;
  function wrapped(...args) {
    emitter.off(type, wrapped);
    return listener.apply(emitter, args);
  }
  wrapped.listener = listener;
  return this.on(type, wrapped);
};

EventEmitter.prototype.off = function off(type, listener) {
  const list = listenersOf(this, type);
  const at = list.findIndex((l) => l === listener || l.listener === listener);
  if (at >= 0) list.splice(at, 1);
  if (list.length === 0) delete this._events[type];
  return this;
};
EventEmitter.prototype.removeListener = EventEmitter.prototype.off;

EventEmitter.prototype.removeAllListeners = function removeAllListeners(type) {
  if (type === undefined) this._events = Object.create(null);
  else if (this._events) delete this._events[type];
  return this;
};

EventEmitter.prototype.emit = function emit(type, ...args) {
  const list = this._events && this._events[type];
  if (!list || list.length === 0) {
    if (type === 'error') throw args[0] instanceof Error ? args[0] : new Error('Unhandled error: ' + args[0]);
    return false;
  }
  for (const listener of list.slice()) listener.apply(this, args);
  return true;
};

EventEmitter.prototype.listeners = function listeners(type) {
  return (this._events && this._events[type] ? this._events[type] : []).map((l) => l.listener || l);
};

EventEmitter.prototype.listenerCount = function listenerCount(type) {
  return this._events && this._events[type] ? this._events[type].length : 0;
};

EventEmitter.prototype.eventNames = function eventNames() {
  return this._events ? Object.keys(this._events) : [];
};

EventEmitter.prototype.setMaxListeners = function setMaxListeners(n) {
  this._maxListeners = n;
  return this;
};

EventEmitter.prototype.getMaxListeners = function getMaxListeners() {
  return this._maxListeners === undefined ? EventEmitter.defaultMaxListeners : this._maxListeners;
};

EventEmitter.defaultMaxListeners = 10;

module.exports = EventEmitter;
module.exports.EventEmitter = EventEmitter;
