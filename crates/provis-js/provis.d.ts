// Types for the provis host API: the global `provis` that services call,
// and `provis:test`, the assertion API of `provis service test`.
// A test in provis-js fails when a host function is missing here.
// `provis service new` puts this file next to the service's modules.

/** A JSON value: what arguments, results, state and events carry. */
type ProvisJson = null | boolean | number | string | ProvisJson[] | { [key: string]: ProvisJson };

declare namespace provis {
  /** Who runs the service. */
  namespace minion {
    /** The minion's id. */
    const id: string;
    /** Its roles, most specific last (`web`, `web.eu`). */
    const roles: readonly string[];
  }

  /** The minion's facts: hostname, os, os_version, kernel, arch, cpus, mem_total_mb, disks, addresses, labels, version. */
  const facts: { readonly [fact: string]: ProvisJson };

  /** This service's config, merged from the minion's roles. */
  const config: { readonly [key: string]: ProvisJson };

  /** The service's own state on the minion, persisted; other services' state read-only. */
  namespace state {
    /** A value of this service's state (or of `service`'s), or undefined. */
    function get(key: string, service?: string): ProvisJson | undefined;
    /** Sets a value of this service's state. */
    function set(key: string, value: ProvisJson): void;
    /** Deletes a key; true when it was there. */
    function delete_(key: string): boolean;
    export { delete_ as delete };
    /** Entries whose key starts with `prefix`, in key order. */
    function list(prefix?: string, service?: string): { key: string; value: ProvisJson }[];
  }

  /** Events on `provis.event.<minion>.<service>.<kind>`. */
  namespace events {
    /** Publishes an event of `kind` with `data`. */
    function emit(kind: string, data?: ProvisJson): void;
  }

  /** The minion's log, with minion and service fields. */
  namespace log {
    function debug(message: unknown): void;
    function info(message: unknown): void;
    function warn(message: unknown): void;
    function error(message: unknown): void;
  }

  /** Files under the directories the manifest grants (`capabilities.fs`). */
  namespace fs {
    /** The text of a file; needs `fs.read` (or `fs.write`) over it. */
    function read(path: string): string;
    /** Whether the path exists; needs `fs.read` over it. */
    function exists(path: string): boolean;
    /** The names in a directory, sorted; needs `fs.read` over it. */
    function list(dir: string): string[];
    /** Writes a file; needs `fs.write` over it. */
    function write(path: string, text: string): void;
    /** Creates a directory and its parents; needs `fs.write` over it. */
    function mkdir(path: string): void;
    /** Removes a file or an empty directory; needs `fs.write` over it. */
    function remove(path: string): void;
  }

  /** Programs the manifest lists (`capabilities.exec`), run without a shell. */
  namespace exec {
    /** Runs `program` with `args`; it must finish within `timeout_ms` (default 10 s) and the call's deadline. */
    function run(
      program: string,
      args?: string[],
      options?: { timeout_ms?: number },
    ): { code: number | null; stdout: string; stderr: string };
  }

  /** HTTP to the hosts the manifest lists (`capabilities.http`); no redirects followed. */
  namespace http {
    function request(request: {
      url: string;
      method?: string;
      headers?: { [name: string]: string };
      body?: string;
      timeout_ms?: number;
    }): { status: number; headers: { [name: string]: string }; body: string };
  }

  /** Secrets sealed to this minion, for the names the manifest lists (`capabilities.secrets`). */
  namespace secrets {
    /** The secret's value; throws when it is not granted or not sealed to this minion. Its value is redacted from results, errors, events, logs and state. */
    function get(name: string): string;
  }

  /** The fleet's state database, if the manifest sets `fleet_query = true`. */
  namespace fleet {
    /** Minions matching a CEL expression now, for a whole window (`for_ms`) or at least once in it (`any_ms`). */
    function query(
      expression: string,
      options?: { for_ms?: number; any_ms?: number },
    ): {
      matches: { minion: string; live: boolean; coverage_pct?: number; note?: string; state: ProvisJson }[];
      short_history?: { minion: string; live: boolean; coverage_pct?: number; note?: string; state: ProvisJson }[];
      considered: number;
      counters: { [name: string]: number };
    };
  }
}

/** The assertion API of `provis service test DIR`. */
declare module "provis:test" {
  /** Registers a test; `fn` may be async. Tests run in order, each module in a fresh sandbox. */
  export function test(name: string, fn: () => void | Promise<void>): void;
  export class AssertionError extends Error {}
  export const assert: {
    ok(value: unknown, message?: string): asserts value;
    equal<T>(actual: unknown, expected: T, message?: string): asserts actual is T;
    notEqual(actual: unknown, expected: unknown, message?: string): void;
    deepEqual<T>(actual: unknown, expected: T, message?: string): asserts actual is T;
    throws(fn: () => unknown, pattern?: RegExp, message?: string): unknown;
    rejects(promiseOrFn: Promise<unknown> | (() => Promise<unknown>), pattern?: RegExp, message?: string): Promise<unknown>;
    fail(message?: string): never;
  };
}
