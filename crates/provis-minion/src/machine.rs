//! What a minion knows about its machine: facts (what it is, gathered at
//! start) and samples (how it is doing, taken at every heartbeat). Both are
//! JSON documents; their fields are what `--where` expressions and services
//! (`provis.facts`) see, so their names are part of the contract:
//!
//! facts: `hostname os os_version kernel arch cpus mem_total_mb disks[]{mount fs total_gb}
//! addresses[] labels{} version`
//!
//! state: `mem{total_mb free_mb free_pct used_pct} disk{mount total_gb free_gb free_pct}
//! disks[]{…} cpu_pct load{one five fifteen} uptime_s at_unix_ms`
//! (`disk` is the root filesystem, or the fullest disk when `/` is not listed).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sysinfo::{Disks, Networks, System};

fn gb(bytes: u64) -> f64 {
    (bytes as f64 / 1e9 * 10.0).round() / 10.0
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 1000.0 / whole as f64).round() / 10.0
    }
}

/// The summary of a sample the registry keeps: every number rounded to two
/// significant digits, the clock fields left out, so it changes (and the
/// record is written) only when the machine's state really does.
pub fn summary(sample: &Value) -> Value {
    match sample {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .filter(|(name, _)| !matches!(name.as_str(), "at_unix_ms" | "uptime_s"))
                .map(|(name, value)| (name.clone(), summary(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(summary).collect()),
        Value::Number(number) => number
            .as_f64()
            .map_or(Value::Null, |x| json!(two_significant_digits(x))),
        other => other.clone(),
    }
}

fn two_significant_digits(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return 0.0;
    }
    let magnitude = x.abs().log10().floor() as i32;
    let scale = 10f64.powi(1 - magnitude);
    (x * scale).round() / scale
}

/// Reads the machine; keeps sysinfo's handles between samples so CPU use
/// can be measured as a difference.
#[derive(Debug)]
pub struct Machine {
    system: Option<System>,
    disks: Option<Disks>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Self {
        Self {
            system: System::new().ok(),
            disks: Disks::new_with_refreshed_list().ok(),
        }
    }

    /// Facts: what this machine is. `labels` come from the minion's settings.
    pub fn facts(&mut self, labels: &BTreeMap<String, String>) -> Value {
        let mem_total = self.system.as_mut().map_or(0, |system| {
            system.refresh_memory();
            system.total_memory()
        });
        let disks: Vec<Value> = self
            .disk_list()
            .into_iter()
            .map(|(mount, fs, total, _)| json!({ "mount": mount, "fs": fs, "total_gb": gb(total) }))
            .collect();
        let mut addresses: Vec<String> = Networks::new_with_refreshed_list()
            .map(|networks| {
                networks
                    .values()
                    .flat_map(|data| {
                        data.ip_networks()
                            .iter()
                            .map(|n| n.addr.to_string())
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .unwrap_or_default();
        addresses.sort();
        addresses.dedup();
        json!({
            "hostname": System::host_name().unwrap_or_default(),
            "os": System::distribution_id(),
            "os_version": System::long_os_version().unwrap_or_default(),
            "kernel": System::kernel_version().unwrap_or_default(),
            "arch": std::env::consts::ARCH,
            "cpus": std::thread::available_parallelism().map_or(1, usize::from),
            "mem_total_mb": mem_total / (1024 * 1024),
            "disks": disks,
            "addresses": addresses,
            "labels": labels,
            "version": provis_core::VERSION,
        })
    }

    /// A state sample: how this machine is doing now.
    pub fn sample(&mut self) -> Value {
        let (total, available, cpu_pct) = self.system.as_mut().map_or((0, 0, 0.0), |system| {
            system.refresh_memory();
            system.refresh_cpu_usage();
            (
                system.total_memory(),
                system.available_memory(),
                f64::from(system.global_cpu_usage()),
            )
        });
        let load = System::load_average().map_or(
            json!({"one": 0.0, "five": 0.0, "fifteen": 0.0}),
            |l| json!({ "one": l.one, "five": l.five, "fifteen": l.fifteen }),
        );
        let disks: Vec<Value> = self
            .disk_list()
            .into_iter()
            .map(|(mount, _, total, free)| {
                json!({ "mount": mount, "total_gb": gb(total), "free_gb": gb(free), "free_pct": pct(free, total) })
            })
            .collect();
        let root = disks
            .iter()
            .find(|d| d["mount"] == "/")
            .or_else(|| {
                disks.iter().min_by(|a, b| {
                    a["free_pct"]
                        .as_f64()
                        .partial_cmp(&b["free_pct"].as_f64())
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
            })
            .cloned()
            .unwrap_or(json!({ "mount": "", "total_gb": 0.0, "free_gb": 0.0, "free_pct": 0.0 }));
        json!({
            "mem": {
                "total_mb": total / (1024 * 1024),
                "free_mb": available / (1024 * 1024),
                "free_pct": pct(available, total),
                "used_pct": pct(total.saturating_sub(available), total),
            },
            "disk": root,
            "disks": disks,
            "cpu_pct": (cpu_pct * 10.0).round() / 10.0,
            "load": load,
            "uptime_s": System::uptime().unwrap_or_default(),
            "at_unix_ms": provis_core::envelope::now_unix_ms(),
        })
    }

    /// (mount, filesystem, total bytes, available bytes) of each real disk, once per mount.
    fn disk_list(&mut self) -> Vec<(String, String, u64, u64)> {
        let Some(disks) = self.disks.as_mut() else {
            return Vec::new();
        };
        disks.refresh(true);
        let mut list: Vec<(String, String, u64, u64)> = disks
            .iter()
            .filter(|d| d.total_space() > 0)
            .map(|d| {
                (
                    d.mount_point().display().to_string(),
                    d.file_system().to_string_lossy().into_owned(),
                    d.total_space(),
                    d.available_space(),
                )
            })
            .collect();
        list.sort();
        list.dedup_by(|a, b| a.0 == b.0);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_changes_only_when_the_state_really_does() {
        let sample = |free_mb: u64, cpu: f64, at: i64| {
            json!({ "mem": { "free_mb": free_mb, "free_pct": 37.4 }, "cpu_pct": cpu,
                    "disks": [{ "mount": "/", "free_gb": 80.1 }], "uptime_s": at, "at_unix_ms": at })
        };
        let a = summary(&sample(23_012, 3.21, 1));
        assert_eq!(a, summary(&sample(22_987, 3.24, 2)));
        assert_ne!(a, summary(&sample(12_000, 3.2, 3)));
        assert_eq!(a["mem"]["free_mb"], json!(23_000.0));
        assert_eq!(a["mem"]["free_pct"], json!(37.0));
        assert_eq!(a["disks"][0]["mount"], "/");
        assert!(a.get("at_unix_ms").is_none());
    }
}
