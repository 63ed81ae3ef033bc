//! What a process costs the machine, read from `/proc`: resident memory
//! and CPU time, for benchmarks that report cost per minion.

/// One reading of a process's resident memory and the CPU time it used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessUsage {
    pub rss_bytes: u64,
    /// User and system time since the process started.
    pub cpu_seconds: f64,
}

/// Clock ticks per second in `/proc/<pid>/stat`: Linux's USER_HZ, fixed at
/// 100 for user space whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

impl ProcessUsage {
    /// Reads process `pid` now (`std::process::id()` for this one).
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces, in
        // parentheses): state is field 3, utime 14 and stime 15.
        let after_name = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(index - 3)
                .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
                .parse::<f64>()?)
        };
        Ok(Self {
            rss_bytes: rss_kib * 1024,
            cpu_seconds: (ticks(14)? + ticks(15)?) / USER_HZ,
        })
    }
}
