// `provis call --all release.satisfies '{"range": ">=0.1"}'`: whether each
// minion's provis version is in a range, with semver as npm installed it
// (a CommonJS package, converted when the bundle is packed).
import semver from "semver";

export interface Answer {
  version: string;
  range: string;
  satisfies: boolean;
  major: number | null;
}

/** Whether this minion's provis (or `version`) satisfies `range`. */
export function satisfies(args: { range: string; version?: string }): Answer {
  if (semver.validRange(args.range) === null) {
    throw new RangeError(`not a semver range: ${args.range}`);
  }
  const version = args.version ?? String(provis.facts.version ?? "0.0.0");
  return {
    version,
    range: args.range,
    satisfies: semver.satisfies(version, args.range),
    major: semver.parse(version)?.major ?? null,
  };
}

/** The highest of `versions` that satisfies `range`, as semver picks it. */
export function pick(args: { versions: string[]; range: string }): string | null {
  return semver.maxSatisfying(args.versions, args.range);
}
