//! What the sidecar itself costs, read from `/proc/self` when metrics are
//! scraped: operators watch a sidecar's footprint with the same dashboard
//! as its traffic. Off Linux (or without /proc) the readings are absent.
//! The benchmarks read other processes the same way.

/// Resident memory, in bytes (`VmRSS`).
pub fn resident_bytes() -> Option<u64> {
    status_bytes("self", "VmRSS:")
}

/// CPU time used so far, user and system, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    cpu_seconds_of("self")
}

/// A `/proc/<process>/status` field given in kB (`VmRSS:`, `VmHWM:`,
/// `RssAnon:`), in bytes; `process` is a pid or `self`.
pub fn status_bytes(process: impl std::fmt::Display, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    parse_kib(&status, field).map(|kib| kib * 1024)
}

/// The CPU time (user and system) of `/proc/<process>` and its threads,
/// in seconds.
pub fn cpu_seconds_of(process: impl std::fmt::Display) -> Option<f64> {
    cpu_split_of(process).map(|(user, system)| user + system)
}

/// The CPU time of `/proc/<process>` and its threads, in seconds, as
/// (user, system): the benchmarks tell the proxy's own work from the
/// kernel's.
pub fn cpu_split_of(process: impl std::fmt::Display) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    parse_cpu_ticks(&stat).map(|(user, system)| (user as f64 / hz, system as f64 / hz))
}

fn parse_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// utime and stime from `/proc/<pid>/stat`: fields 14 and 15, counted
/// after the command name, which may itself hold spaces and parentheses.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split(' ').skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user, system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_formats_parse() {
        assert_eq!(
            parse_kib("Name:\tx\nVmRSS:\t   9480 kB\nThreads: 1\n", "VmRSS:"),
            Some(9480)
        );
        assert_eq!(parse_kib("Name:\tx\n", "VmRSS:"), None);
        let stat = "42 (weft proxy) (x)) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some((250, 75)));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_reads_back() {
        if std::fs::metadata("/proc/self/stat").is_err() {
            eprintln!("skipping: no /proc");
            return;
        }
        assert!(resident_bytes().is_some_and(|b| b > 1024 * 1024));
        assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
