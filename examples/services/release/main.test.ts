import { test, assert } from "provis:test";
import { pick, satisfies } from "./main.ts";

test("a version inside the range satisfies it", () => {
  const answer = satisfies({ range: "^1.2.0", version: "1.4.2" });
  assert.deepEqual(answer, { version: "1.4.2", range: "^1.2.0", satisfies: true, major: 1 });
});

test("pick takes the highest match", () => {
  assert.equal(pick({ versions: ["1.0.0", "1.9.1", "2.0.0"], range: "1.x" }), "1.9.1");
});

test("a bad range is refused", () => {
  assert.throws(() => satisfies({ range: "not a range" }), /not a semver range/);
});
