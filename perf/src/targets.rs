//! The efficiency issue's targets for the data path, judged on one bench
//! run's figures: each target, what weft measured, what it is held
//! against, and whether it is met. A target whose peer was not run (no
//! nginx or HAProxy on the machine) is left out rather than guessed.
//! "Two alternating runs agreeing" is then two reports that say "met".

/// The figures of one run that the targets are judged on. Latencies are
/// added over direct's, in ms; `None` where the scenario did not run.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Requests per CPU-second per proxy, closed loop: weft, HAProxy.
    pub per_cpu: (Option<f64>, Option<f64>),
    /// Closed-loop throughput, req/s: weft, HAProxy.
    pub closed_loop: (Option<f64>, Option<f64>),
    /// Added p99 at each fixed rate: (rate, weft, HAProxy).
    pub added_p99: Vec<(u64, f64, Option<f64>)>,
    /// One connection, closed loop, added p50: weft, nginx.
    pub one_connection: (Option<f64>, Option<f64>),
    /// The client sidecar's RSS with the large mesh, bytes.
    pub large_mesh_rss: Option<u64>,
}

/// One target, as this run measured it.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub target: String,
    pub weft: String,
    pub against: String,
    pub met: bool,
}

/// 1.1x HAProxy's requests per CPU-second.
const PER_CPU_OVER_HAPROXY: f64 = 1.1;
/// The client sidecar's RSS with the large mesh stays under this.
pub const RSS_LIMIT: u64 = 10_000_000;

/// Each target this run can judge.
pub fn judge(f: &Figures) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    let mut add = |target: String, weft: String, against: String, met: bool| {
        verdicts.push(Verdict {
            target,
            weft,
            against,
            met,
        })
    };
    if let (Some(w), Some(h)) = f.per_cpu {
        add(
            format!("requests per CPU-second per proxy ≥ {PER_CPU_OVER_HAPROXY}x HAProxy's"),
            format!("{w:.0} ({:.2}x)", w / h.max(1e-9)),
            format!("HAProxy {h:.0}"),
            w >= PER_CPU_OVER_HAPROXY * h,
        );
    }
    if let (Some(w), Some(h)) = f.closed_loop {
        add(
            "closed-loop throughput ≥ HAProxy's".into(),
            format!("{w:.0} req/s"),
            format!("HAProxy {h:.0} req/s"),
            w >= h,
        );
    }
    for &(rate, w, h) in &f.added_p99 {
        if let Some(h) = h {
            add(
                format!("added p99 at {rate} req/s ≤ HAProxy's"),
                format!("{w:.3} ms"),
                format!("HAProxy {h:.3} ms"),
                w <= h,
            );
        }
    }
    if let (Some(w), Some(n)) = f.one_connection {
        add(
            "one connection, closed loop: added p50 ≤ nginx's".into(),
            format!("{w:.3} ms"),
            format!("nginx {n:.3} ms"),
            w <= n,
        );
    }
    if let Some(rss) = f.large_mesh_rss {
        add(
            "client sidecar RSS with the large mesh < 10 MB".into(),
            format!("{:.2} MB", rss as f64 / 1e6),
            "10 MB".into(),
            rss < RSS_LIMIT,
        );
    }
    verdicts
}

/// The report's section: a table of the verdicts and how many are met.
pub fn markdown(verdicts: &[Verdict]) -> String {
    if verdicts.is_empty() {
        return String::new();
    }
    let met = verdicts.iter().filter(|v| v.met).count();
    let mut md = format!(
        "\n## The efficiency targets in this run\n\n{met} of {} met.\n\n| target | weft | against | |\n|---|---|---|---|\n",
        verdicts.len()
    );
    for v in verdicts {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            v.target,
            v.weft,
            v.against,
            if v.met { "met" } else { "not met" }
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Figures {
        Figures {
            per_cpu: (Some(56_000.0), Some(52_000.0)),
            closed_loop: (Some(31_000.0), Some(30_000.0)),
            added_p99: vec![(1000, 0.20, Some(0.20)), (5000, 0.50, Some(0.40))],
            one_connection: (Some(0.068), Some(0.063)),
            large_mesh_rss: Some(9_350_000),
        }
    }

    #[test]
    fn each_target_is_judged_by_its_own_rule() {
        let met: Vec<bool> = judge(&run()).iter().map(|v| v.met).collect();
        // 56k is 1.08x HAProxy (not 1.1x); more throughput; equal p99 is
        // met, a higher one not; a slower round trip; under 10 MB.
        assert_eq!(met, [false, true, true, false, false, true]);
        let mut faster = run();
        faster.per_cpu.0 = Some(57_300.0);
        assert!(judge(&faster)[0].met, "1.102x HAProxy");
        let mut heavy = run();
        heavy.large_mesh_rss = Some(10_000_000);
        assert!(
            !judge(&heavy).last().unwrap().met,
            "10 MB is not under 10 MB"
        );
    }

    #[test]
    fn a_peer_that_did_not_run_is_left_out() {
        let alone = Figures {
            per_cpu: (Some(50_000.0), None),
            closed_loop: (Some(30_000.0), None),
            added_p99: vec![(1000, 0.2, None)],
            one_connection: (Some(0.07), None),
            large_mesh_rss: Some(9_000_000),
        };
        let verdicts = judge(&alone);
        assert_eq!(verdicts.len(), 1, "{verdicts:?}");
        let md = markdown(&verdicts);
        assert!(md.contains("1 of 1 met"), "{md}");
        assert!(markdown(&[]).is_empty());
    }
}
