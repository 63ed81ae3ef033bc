// Bare imports resolve from this folder's vendored node_modules/; relative
// ones from the folder itself.
import { titleCase } from "tiny-case";
import { punctuate } from "./lib/punctuate.js";

export function hello(args) {
  const greeting = titleCase(provis.config.greeting ?? "hello");
  const name = args?.name ?? provis.minion.id;
  return { text: punctuate(`${greeting}, ${name}`) };
}

export async function count() {
  // Methods may be async.
  const seen = (provis.state.get("count") ?? 0) + 1;
  provis.state.set("count", seen);
  return { seen };
}

export function token() {
  // A secret sealed to this minion (the demo seals `greeting_token` for
  // web.eu and grants it in service.toml). Its value never leaves the
  // sandbox: here `shown` comes back as "[secret greeting_token]".
  const token = provis.secrets.get("greeting_token");
  return { length: token.length, shown: token };
}
