// The experimental web site: a page under the role's `root`, one folder per
// minion, switched on and off; each switch is an event and is remembered.

function page() {
  const root = provis.config.root ?? "/tmp/provis-demo/www";
  return { dir: `${root}/${provis.minion.id}`, file: `${root}/${provis.minion.id}/experimental.html` };
}

export function enable(args) {
  const { dir, file } = page();
  const banner = provis.config.banner ?? "experimental";
  provis.fs.mkdir(dir);
  provis.fs.write(file, `<h1>${banner} site on ${provis.minion.id}</h1>\n`);
  const since = { at: new Date().toISOString(), by: args?.by ?? null };
  provis.state.set("enabled", since);
  provis.events.emit("enabled", { file, ...since });
  provis.log.info(`experimental site enabled at ${file}`);
  return { enabled: true, file };
}

export function disable() {
  const { file } = page();
  const removed = provis.fs.remove(file);
  provis.state.delete("enabled");
  provis.events.emit("disabled", { file, removed });
  return { enabled: false, removed };
}

export function status() {
  const { file } = page();
  return { enabled: provis.fs.exists(file), since: provis.state.get("enabled") ?? null };
}
