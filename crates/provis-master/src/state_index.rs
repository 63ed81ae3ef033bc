//! The master's state index: the latest sample of every minion and a
//! downsampled history (per minion, per time bucket: min, max and sum of
//! every numeric field), fed live from `PROVIS_STATE` and rebuilt from it on
//! start. A week of a large fleet fits in memory (one bucket holds 16 bytes
//! per numeric field) and answers without touching the stream.
//!
//! Samples are placed by their own timestamps. A sample is kept out (and
//! counted) when it is malformed, claims another minion's id, lies in the
//! future or beyond retention, or comes sooner than `min_spacing` after the
//! previous one of the same minion (rate limit). All of these depend only
//! on the samples themselves, so a rebuild from the stream gives the same
//! index as the live feed did.

use std::collections::{BTreeMap, HashMap};

use provis_core::state::StateSample;
use serde_json::{Map, Value};

/// Most distinct numeric fields the history keeps (the samples provis
/// minions send have about a dozen); later new names are not kept.
pub const MAX_FIELDS: usize = 256;

/// How the index groups and bounds samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexLimits {
    /// Width of a history bucket.
    pub bucket_ms: i64,
    /// History older than this is dropped.
    pub retention_ms: i64,
    /// Samples of one minion closer together than this are dropped.
    pub min_spacing_ms: i64,
    /// Samples stamped further than this in the future are dropped.
    pub future_tolerance_ms: i64,
}

impl Default for IndexLimits {
    fn default() -> Self {
        Self {
            bucket_ms: 3_600_000,
            retention_ms: 8 * 86_400_000,
            min_spacing_ms: 1_000,
            future_tolerance_ms: 300_000,
        }
    }
}

pub use provis_core::master_api::IndexCounters;

#[derive(Debug, Clone, Copy)]
struct Stat {
    min: f32,
    max: f32,
    sum: f32,
    n: u32,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    stats: Vec<Option<Stat>>,
}

#[derive(Debug, Default)]
struct History {
    latest: Option<StateSample>,
    last_at: Option<i64>,
    buckets: BTreeMap<i64, Bucket>,
}

/// A minion's state over a window: the extremes of every numeric field, and
/// how much of the window its samples cover.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowView {
    /// The latest sample with each numeric field at its lowest in the window.
    pub low: Value,
    /// The same at its highest.
    pub high: Value,
    /// Buckets of the window with at least one sample, in percent.
    pub coverage_pct: f64,
    /// Time of the first bucket with a sample in the window.
    pub first_ms: i64,
}

#[derive(Debug, Default)]
pub struct StateIndex {
    limits: IndexLimits,
    fields: Vec<String>,
    field_ids: HashMap<String, usize>,
    minions: BTreeMap<String, History>,
    counters: IndexCounters,
}

impl StateIndex {
    pub fn new(limits: IndexLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    pub fn counters(&self) -> IndexCounters {
        self.counters
    }

    pub fn limits(&self) -> IndexLimits {
        self.limits
    }

    /// Takes one message of `<prefix>.state.<id>`; `subject_minion` is `<id>`.
    pub fn ingest(&mut self, subject_minion: &str, payload: &[u8], now_ms: i64) {
        let sample = match serde_json::from_slice::<StateSample>(payload) {
            Ok(sample) if sample.minion.as_str() == subject_minion && sample.state.is_object() => {
                sample
            }
            Ok(sample) => {
                tracing::warn!(subject_minion, claimed = %sample.minion, "state sample refused: not its own, or not an object");
                self.counters.malformed += 1;
                return;
            }
            Err(err) => {
                tracing::warn!(subject_minion, error = %err, "malformed state sample refused");
                self.counters.malformed += 1;
                return;
            }
        };
        let at = sample.at_unix_ms;
        if at > now_ms + self.limits.future_tolerance_ms || at < now_ms - self.limits.retention_ms {
            self.counters.out_of_window += 1;
            return;
        }
        let history = self.minions.entry(subject_minion.to_owned()).or_default();
        if let Some(last) = history.last_at
            && (at - last).abs() < self.limits.min_spacing_ms
        {
            self.counters.rate_limited += 1;
            return;
        }
        history.last_at = Some(history.last_at.map_or(at, |last| last.max(at)));
        let mut numeric = Vec::new();
        flatten(&sample.state, String::new(), &mut numeric);
        let bucket = history
            .buckets
            .entry(at.div_euclid(self.limits.bucket_ms))
            .or_default();
        for (path, value) in numeric {
            let id = match self.field_ids.get(&path) {
                Some(id) => *id,
                // A bounded schema: a minion inventing field names must not grow the master.
                None if self.fields.len() >= MAX_FIELDS => continue,
                None => {
                    self.fields.push(path.clone());
                    self.field_ids.insert(path, self.fields.len() - 1);
                    self.fields.len() - 1
                }
            };
            if bucket.stats.len() <= id {
                bucket.stats.resize(id + 1, None);
            }
            let value = value as f32;
            bucket.stats[id] = Some(match bucket.stats[id] {
                None => Stat {
                    min: value,
                    max: value,
                    sum: value,
                    n: 1,
                },
                Some(s) => Stat {
                    min: s.min.min(value),
                    max: s.max.max(value),
                    sum: s.sum + value,
                    n: s.n + 1,
                },
            });
        }
        if history
            .latest
            .as_ref()
            .is_none_or(|latest| latest.at_unix_ms <= at)
        {
            history.latest = Some(sample);
        }
        self.counters.accepted += 1;
    }

    /// Drops history older than the retention.
    pub fn prune(&mut self, now_ms: i64) {
        let oldest = (now_ms - self.limits.retention_ms).div_euclid(self.limits.bucket_ms);
        for history in self.minions.values_mut() {
            history.buckets = history.buckets.split_off(&oldest);
        }
    }

    pub fn minions(&self) -> impl Iterator<Item = &str> {
        self.minions.keys().map(String::as_str)
    }

    pub fn latest(&self, minion: &str) -> Option<&StateSample> {
        self.minions.get(minion)?.latest.as_ref()
    }

    /// The extremes of `minion`'s state over `[from_ms, to_ms]`.
    pub fn window(&self, minion: &str, from_ms: i64, to_ms: i64) -> Option<WindowView> {
        let history = self.minions.get(minion)?;
        let base = history.latest.as_ref()?.state.clone();
        let (first, last) = (
            from_ms.div_euclid(self.limits.bucket_ms),
            to_ms.div_euclid(self.limits.bucket_ms),
        );
        let mut low: Vec<Option<f32>> = vec![None; self.fields.len()];
        let mut high: Vec<Option<f32>> = vec![None; self.fields.len()];
        let mut covered = 0usize;
        let mut first_ms = None;
        for (index, bucket) in history.buckets.range(first..=last) {
            covered += 1;
            first_ms.get_or_insert(index * self.limits.bucket_ms);
            for (id, stat) in bucket.stats.iter().enumerate() {
                if let Some(stat) = stat {
                    low[id] = Some(low[id].map_or(stat.min, |v| v.min(stat.min)));
                    high[id] = Some(high[id].map_or(stat.max, |v| v.max(stat.max)));
                }
            }
        }
        let first_ms = first_ms?;
        let expected = usize::try_from(last - first + 1).unwrap_or(1).max(1);
        Some(WindowView {
            low: self.overlay(&base, &low),
            high: self.overlay(&base, &high),
            coverage_pct: (covered as f64 * 1000.0 / expected as f64).round() / 10.0,
            first_ms,
        })
    }

    /// Each bucket of the window as (its start, low, high), oldest first:
    /// the points of a chart over days.
    pub fn bucket_series(
        &self,
        minion: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Vec<(i64, Value, Value)> {
        let starts: Vec<i64> = self.minions.get(minion).map_or_else(Vec::new, |history| {
            let range =
                from_ms.div_euclid(self.limits.bucket_ms)..=to_ms.div_euclid(self.limits.bucket_ms);
            history
                .buckets
                .range(range)
                .map(|(index, _)| index * self.limits.bucket_ms)
                .collect()
        });
        starts
            .into_iter()
            .zip(self.buckets(minion, from_ms, to_ms))
            .map(|(at, (low, high))| (at, low, high))
            .collect()
    }

    /// Each bucket of the window as (low, high) samples, oldest first.
    pub fn buckets(&self, minion: &str, from_ms: i64, to_ms: i64) -> Vec<(Value, Value)> {
        let Some(history) = self.minions.get(minion) else {
            return Vec::new();
        };
        let Some(base) = history.latest.as_ref().map(|l| &l.state) else {
            return Vec::new();
        };
        let range =
            from_ms.div_euclid(self.limits.bucket_ms)..=to_ms.div_euclid(self.limits.bucket_ms);
        history
            .buckets
            .range(range)
            .map(|(_, bucket)| {
                let low: Vec<Option<f32>> = bucket.stats.iter().map(|s| s.map(|s| s.min)).collect();
                let high: Vec<Option<f32>> =
                    bucket.stats.iter().map(|s| s.map(|s| s.max)).collect();
                (self.overlay(base, &low), self.overlay(base, &high))
            })
            .collect()
    }

    fn overlay(&self, base: &Value, values: &[Option<f32>]) -> Value {
        let mut out = base.clone();
        for (id, value) in values.iter().enumerate() {
            if let Some(value) = value {
                set_path(&mut out, &self.fields[id], f64::from(*value));
            }
        }
        out
    }

    /// A fingerprint of everything indexed: equal fingerprints, equal indexes.
    pub fn fingerprint(&self) -> String {
        let mut text = String::new();
        for (minion, history) in &self.minions {
            text.push_str(minion);
            if let Some(latest) = &history.latest {
                text.push_str(&latest.at_unix_ms.to_string());
            }
            for (index, bucket) in &history.buckets {
                text.push_str(&index.to_string());
                for (id, stat) in bucket.stats.iter().enumerate() {
                    if let Some(s) = stat {
                        text.push_str(&format!(
                            "|{}:{}:{}:{}:{}",
                            self.fields[id], s.min, s.max, s.sum, s.n
                        ));
                    }
                }
            }
        }
        provis_bundle::digest_of(text.as_bytes())
    }

    /// Bytes the history takes, roughly (buckets and their statistics).
    pub fn approximate_bytes(&self) -> usize {
        self.minions
            .values()
            .map(|h| {
                h.buckets
                    .values()
                    .map(|b| 48 + b.stats.capacity() * std::mem::size_of::<Option<Stat>>())
                    .sum::<usize>()
                    + 512
            })
            .sum()
    }
}

/// Every numeric leaf of `value` outside arrays, as (dotted path, number).
fn flatten(value: &Value, prefix: String, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(value, path, out);
            }
        }
        Value::Number(n) if !prefix.is_empty() && prefix != "at_unix_ms" => {
            if let Some(n) = n.as_f64() {
                out.push((prefix, n));
            }
        }
        _ => {}
    }
}

fn set_path(value: &mut Value, path: &str, number: f64) {
    let mut at = value;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if !at.is_object() {
            *at = Value::Object(Map::new());
        }
        let Value::Object(map) = at else { return };
        if parts.peek().is_none() {
            map.insert(part.to_owned(), serde_json::json!(number));
            return;
        }
        at = map
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOUR: i64 = 3_600_000;

    fn sample(minion: &str, at: i64, free: f64) -> Vec<u8> {
        serde_json::to_vec(&json!({ "minion": minion, "at_unix_ms": at, "state": { "mem": { "free_pct": free }, "disk": { "mount": "/", "free_pct": 50.0 } } })).unwrap()
    }

    #[test]
    fn windows_see_extremes_and_coverage() {
        let now = 100 * HOUR;
        let mut index = StateIndex::new(IndexLimits::default());
        for h in 0..10 {
            index.ingest("m1", &sample("m1", now - h * HOUR, 5.0 + h as f64), now);
        }
        let view = index.window("m1", now - 9 * HOUR, now).unwrap();
        assert_eq!(view.low["mem"]["free_pct"], json!(5.0));
        assert_eq!(view.high["mem"]["free_pct"], json!(14.0));
        assert_eq!(
            view.high["disk"]["mount"],
            json!("/"),
            "non-numeric fields come from the latest sample"
        );
        assert_eq!(view.coverage_pct, 100.0);
        let wider = index.window("m1", now - 19 * HOUR, now).unwrap();
        assert_eq!(wider.coverage_pct, 50.0);
        assert_eq!(index.counters().accepted, 10);
    }

    #[test]
    fn bad_samples_are_counted_and_kept_out() {
        let now = 100 * HOUR;
        let mut index = StateIndex::new(IndexLimits::default());
        index.ingest("m1", b"{not json", now);
        index.ingest("m1", &sample("m2", now, 1.0), now);
        index.ingest("m1", &sample("m1", now + 3 * HOUR, 1.0), now);
        index.ingest("m1", &sample("m1", now - 30 * 24 * HOUR, 1.0), now);
        index.ingest("m1", &sample("m1", now, 1.0), now);
        index.ingest("m1", &sample("m1", now + 10, 2.0), now);
        assert_eq!(
            index.counters(),
            IndexCounters {
                accepted: 1,
                malformed: 2,
                out_of_window: 2,
                rate_limited: 1
            }
        );
        assert_eq!(
            index.latest("m1").unwrap().state["mem"]["free_pct"],
            json!(1.0)
        );
    }

    #[test]
    fn the_same_samples_give_the_same_fingerprint_in_any_order() {
        let now = 100 * HOUR;
        let samples: Vec<Vec<u8>> = (0..50)
            .map(|i| sample("m1", now - i * 60_000, i as f64))
            .collect();
        let mut a = StateIndex::new(IndexLimits::default());
        let mut b = StateIndex::new(IndexLimits::default());
        for s in &samples {
            a.ingest("m1", s, now);
        }
        for s in samples.iter().rev() {
            b.ingest("m1", s, now);
        }
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
