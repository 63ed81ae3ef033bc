// Memory and load from /proc (granted read-only in service.toml), checked
// against the role's `min_free_pct`; the last result is kept in state.

function meminfo() {
  const kb = {};
  for (const line of provis.fs.read("/proc/meminfo").split("\n")) {
    const match = /^(\w+):\s+(\d+)/.exec(line);
    if (match) kb[match[1]] = Number(match[2]);
  }
  const total_mb = Math.round(kb.MemTotal / 1024);
  const free_mb = Math.round((kb.MemAvailable ?? kb.MemFree) / 1024);
  return { total_mb, free_mb, free_pct: Math.round((1000 * free_mb) / total_mb) / 10 };
}

export function check(args) {
  const min_free_pct = args?.min_free_pct ?? provis.config.min_free_pct ?? 10;
  const mem = meminfo();
  const load = provis.fs.read("/proc/loadavg").split(" ").slice(0, 3).map(Number);
  const ok = mem.free_pct >= min_free_pct;
  const result = { ok, mem, load, min_free_pct, cpus: provis.facts.cpus };
  provis.state.set("last", { at: new Date().toISOString(), ...result });
  if (!ok) provis.events.emit("memory.low", result);
  return result;
}

export function last() {
  return provis.state.get("last") ?? null;
}
