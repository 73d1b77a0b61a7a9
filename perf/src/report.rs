//! Where and how results are written: one Markdown file per run, stating the
//! machine, the commit and the exact command, so that a reader can reproduce
//! it and knows what the numbers were measured on.

use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory,
            kernel,
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "- CPU: {} ({} cores available)\n- Memory: {}\n- Kernel: {}\n",
            self.cpu, self.cores, self.memory, self.kernel
        )
    }
}

/// The commit the binary runs from, marked dirty if the tree has changes.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

pub fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}",
        now.year(),
        u8::from(now.month()),
        now.day()
    )
}

/// Resident memory of this process, in bytes.
pub fn rss_bytes() -> u64 {
    proc_bytes(std::process::id(), "VmRSS:")
}

/// A `/proc/<pid>/status` field given in kB (`VmRSS:`, `VmHWM:`), in bytes;
/// 0 when the process is gone.
pub fn proc_bytes(pid: u32, field: &str) -> u64 {
    weft_proxy::usage::status_bytes(pid, field).unwrap_or(0)
}

/// A process's resident memory, and what it is made of: `anon` is its
/// own (heap, stacks), `file` the mapped files' pages (mostly the
/// executable's code, shared by every process running the same binary).
#[derive(Clone, Copy, Debug, Default)]
pub struct Resident {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
}

impl Resident {
    pub fn of(pid: u32) -> Resident {
        Resident {
            rss: proc_bytes(pid, "VmRSS:"),
            anon: proc_bytes(pid, "RssAnon:"),
            file: proc_bytes(pid, "RssFile:") + proc_bytes(pid, "RssShmem:"),
        }
    }

    /// "12.3 MiB (anonymous 4.5, file-backed 7.8)".
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "{:.1} MiB (anonymous {:.1}, file-backed {:.1})",
            mib(self.rss),
            mib(self.anon),
            mib(self.file)
        )
    }
}

/// CPU seconds of a process and all its threads (utime + stime); 0 when
/// the process is gone.
pub fn proc_cpu_seconds(pid: u32) -> f64 {
    weft_proxy::usage::cpu_seconds_of(pid).unwrap_or(0.0)
}

/// What a process has spent so far: CPU seconds in its own code and in
/// the kernel, and how many times its threads were switched out. Where
/// a proxy's cost per request goes at a fixed rate: its work (user) or
/// being woken and moving bytes through the kernel (system, switches).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    pub user: f64,
    pub system: f64,
    pub switches: u64,
}

impl CpuUse {
    /// Zero when the process is gone.
    pub fn of(pid: u32) -> CpuUse {
        let (user, system) = weft_proxy::usage::cpu_split_of(pid).unwrap_or_default();
        CpuUse {
            user,
            system,
            switches: context_switches(pid),
        }
    }

    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// What was spent since `before`, scaled by `share` (the measured
    /// part of a run read across its warm-up too).
    pub fn since(&self, before: &CpuUse, share: f64) -> CpuUse {
        CpuUse {
            user: (self.user - before.user).max(0.0) * share,
            system: (self.system - before.system).max(0.0) * share,
            switches: (self.switches.saturating_sub(before.switches) as f64 * share) as u64,
        }
    }
}

/// Voluntary and involuntary context switches of every thread of `pid`
/// (`/proc/<pid>/status` counts its main thread only).
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|status| parse_switches(&status))
        .sum()
}

fn parse_switches(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|line| {
            line.strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
        })
        .filter_map(|value| value.trim().parse::<u64>().ok())
        .sum()
}

/// One table row of latency percentiles, in milliseconds.
pub fn percentiles_ms(h: &Histogram<u64>) -> [f64; 6] {
    let ms = |us: u64| us as f64 / 1000.0;
    [
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len() as f64,
    ]
}

/// The lines under a result's title: date, commit, the command that made
/// it, and the machine.
pub fn header(command: &str) -> String {
    let machine = Machine::read().markdown();
    format!(
        "- Date: {}\n- Commit: {}\n- Command: `{command}`\n{machine}",
        today(),
        commit()
    )
}

/// A row of `percentiles_ms` as Markdown cells: the five latencies with
/// `decimals` decimals, then the sample count.
pub fn cells(row: &[f64; 6], decimals: usize) -> String {
    let latencies: Vec<String> = row[..5].iter().map(|v| format!("{v:.decimals$}")).collect();
    format!("{} | {}", latencies.join(" | "), row[5])
}

/// Runs a scenario's `drive` on a multi-threaded runtime of its own.
pub fn block_on<T>(drive: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(drive)
}

pub fn write(dir: &Path, scenario: &str, text: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}-{scenario}.md", today()));
    std::fs::write(&path, text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_switches_are_summed_from_status() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), 127);
        assert_eq!(parse_switches("Name:\tx\n"), 0);
    }

    #[test]
    fn this_process_is_read_and_differences_scale() {
        if std::fs::metadata("/proc/self/task").is_err() {
            eprintln!("skipping: no /proc");
            return;
        }
        let before = CpuUse::of(std::process::id());
        // Enough work for the clock tick to see, bounded in time.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
            std::hint::black_box(x);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let after = CpuUse::of(std::process::id());
        assert!(after.total() > before.total(), "{before:?} -> {after:?}");
        assert!(after.switches > before.switches, "{before:?} -> {after:?}");
        let half = after.since(&before, 0.5);
        let whole = after.since(&before, 1.0);
        assert!((half.total() * 2.0 - whole.total()).abs() < 1e-9);
        assert_eq!(CpuUse::of(u32::MAX), CpuUse::default());
    }
}
