//! The `clpmdstat --mirror`-style status table.

use std::fmt::Write;

use mirror_agent::engine::stall::{CLUSTER_PARTITION, DATA_DISK};
use mirror_agent::status::{DiskStatus, PairStatus, ResourceStatus, Role};

/// Render one resource's status as the operator's table.
pub fn status_table(s: &ResourceStatus) -> String {
    match &s.pair {
        Some(p) => pair_table(s, p),
        None => standalone_table(s),
    }
}

fn row(o: &mut String, k: &str, v: &str) {
    let _ = writeln!(o, "{k:<20}{v}");
}

fn row2(o: &mut String, k: &str, a: &str, b: &str) {
    let _ = writeln!(o, "{k:<20}{a:<24}{b}");
}

/// A cluster partition that failed a metadata write (the reason is in the
/// next step and in `--json`).
fn meta_state(e: &Option<String>) -> &'static str {
    if e.is_some() {
        "FAILED"
    } else {
        "OK"
    }
}

/// This node's data disk: a recorded error, else a stall (requests pending,
/// none completing: `disk.io_stalled_secs`), else OK.
fn local_disk_state(d: &DiskStatus) -> String {
    match (d.disk_error, d.io_stalled_secs) {
        (true, _) => "ERROR".into(),
        (false, Some(s)) => format!("STALLED ({s} s)"),
        (false, None) => "OK".into(),
    }
}

/// This node's cluster partition: failed, else stalled, else OK.
fn local_meta_state(d: &DiskStatus) -> String {
    match (&d.metadata_error, d.metadata_stalled_secs) {
        (Some(_), _) => "FAILED".into(),
        (None, Some(s)) => format!("STALLED ({s} s)"),
        (None, None) => "OK".into(),
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Active => "Active",
        Role::Inactive => "Inactive",
    }
}

fn nbd_rows(o: &mut String, s: &ResourceStatus) {
    match (&s.nbd_socket, &s.nbd_tcp) {
        (Some(sock), tcp) => row(
            o,
            "NBD export",
            &format!(
                "{sock}{}",
                tcp.as_ref()
                    .map(|t| format!(", tcp {t}"))
                    .unwrap_or_default()
            ),
        ),
        (None, _) => row(o, "NBD export", "- (not active)"),
    }
    row(
        o,
        "NBD connections",
        &format!(
            "{} open, {} since start",
            s.nbd.connections_open, s.nbd.connections_total
        ),
    );
    row(
        o,
        "NBD requests",
        &format!(
            "{} served, {} errors, {} read, {} written",
            s.nbd.requests,
            s.nbd.errors,
            human(s.nbd.read_bytes),
            human(s.nbd.written_bytes)
        ),
    );
}

fn standalone_table(s: &ResourceStatus) -> String {
    let mut o = String::new();
    let status = if s.color == "GREEN" {
        "Standalone (no peer configured)"
    } else {
        "Standalone, local disk needs attention"
    };
    let _ = writeln!(o, "Mirror Status: {status}\n");
    row(&mut o, &s.resource, &s.node);
    row(&mut o, "Mirror Color", &s.color);
    row(&mut o, "Role", role_name(s.role));
    row(&mut o, "Lastupdate Time", &time(s.disk.last_update));
    row(&mut o, "Disk Error", &local_disk_state(&s.disk));
    row(&mut o, "Cluster Partition", &local_meta_state(&s.disk));
    // Without a peer nothing is mirrored: the bitmap has no meaning.
    row(&mut o, "Difference Percent", "n/a (standalone)");
    row(
        &mut o,
        "Size",
        &format!("{} bytes ({})", s.size, human(s.size)),
    );
    row(&mut o, "Engine", &s.engine);
    nbd_rows(&mut o, s);
    let _ = writeln!(o, "\nNext step: {}", s.next_step);
    o
}

fn pair_table(s: &ResourceStatus, p: &PairStatus) -> String {
    let mut o = String::new();
    let total = p
        .peer_disk
        .as_ref()
        .map(|d| d.difference_percent)
        .unwrap_or(0.0)
        .max(s.disk.difference_percent);
    let status = if p.in_sync && s.color == "GREEN" {
        "Normal".to_string()
    } else if s.color == "YELLOW" {
        "Recovering".to_string()
    } else {
        format!("Abnormal Total Difference: {}", percent(total))
    };
    let _ = writeln!(o, "Mirror Status: {status}\n");
    let pd = p.peer_disk.as_ref();
    let peer_color = peer_color(s, p);
    row2(&mut o, &s.resource, &s.node, &p.peer);
    row2(&mut o, "Mirror Color", &s.color, &peer_color);
    row2(
        &mut o,
        "Role",
        role_name(s.role),
        p.peer_role.map(role_name).unwrap_or("unknown"),
    );
    row2(
        &mut o,
        "Lastupdate Time",
        &time(s.disk.last_update),
        &pd.map(|d| time(d.last_update))
            .unwrap_or_else(|| "-".into()),
    );
    row2(
        &mut o,
        "Break Time",
        &time(s.disk.break_time),
        &pd.map(|d| time(d.break_time)).unwrap_or_else(|| "-".into()),
    );
    let err = |e: bool| if e { "ERROR" } else { "OK" };
    row2(
        &mut o,
        "Disk Error",
        &local_disk_state(&s.disk),
        pd.map(|d| match d.stalled.as_deref() {
            Some(DATA_DISK) if !(d.disk_error || p.peer_disk_error) => "STALLED",
            _ => err(d.disk_error || p.peer_disk_error),
        })
        .unwrap_or(if p.peer_disk_error { "ERROR" } else { "-" }),
    );
    row2(
        &mut o,
        "Cluster Partition",
        &local_meta_state(&s.disk),
        pd.map(|d| match d.stalled.as_deref() {
            Some(CLUSTER_PARTITION) if d.metadata_error.is_none() => "STALLED",
            _ => meta_state(&d.metadata_error),
        })
        .unwrap_or("-"),
    );
    // In sync, set bits are write intents of the keep-dirty cache (regions
    // recently written and acknowledged by both sides), not differences.
    let diff = |pct: f64, regions: u64| {
        if p.in_sync && regions > 0 {
            format!("0% ({regions} write intents)")
        } else {
            percent(pct)
        }
    };
    row2(
        &mut o,
        "Difference Percent",
        &diff(s.disk.difference_percent, s.disk.dirty_regions),
        &pd.map(|d| diff(d.difference_percent, d.dirty_regions))
            .unwrap_or_else(|| "-".into()),
    );
    let cons = |c: bool| if c { "yes" } else { "NO (resync target)" };
    row2(
        &mut o,
        "Consistent",
        cons(s.disk.consistent),
        pd.map(|d| cons(d.consistent)).unwrap_or("-"),
    );
    row2(
        &mut o,
        "Generation",
        &s.disk.current_generation,
        pd.map(|d| d.current_generation.as_str()).unwrap_or("-"),
    );
    if pd.is_some() && p.connection != "connected" {
        // Its state may have changed since (a crash, a disk failure).
        let _ = writeln!(
            o,
            "({} is not connected: its column is what it last reported)",
            p.peer
        );
    }
    let _ = writeln!(o);
    row(
        &mut o,
        "Connection",
        &match &p.peer_address {
            Some(a) => format!("{} ({a})", p.connection),
            None => p.connection.clone(),
        },
    );
    row(&mut o, "Sync", &p.sync);
    if let Some(d) = &p.decision {
        row(&mut o, "Decision", d);
    }
    if let Some(a) = &p.auto_recovery {
        row(&mut o, "Auto Recovery", &format!("waiting: {a}"));
    }
    if let Some(r) = &p.recovery {
        recovery_rows(&mut o, r);
    }
    row(&mut o, "Mode", &s.mode);
    if let Some(b) = &p.last_break {
        row(&mut o, "Last Break", b);
    }
    if let Some(r) = &p.rpo {
        row(
            &mut o,
            "RPO (not ack1)",
            &format!("{} writes, {}", r.unacked1_writes, human(r.unacked1_bytes)),
        );
        row(
            &mut o,
            "RPO (not ack2)",
            &format!("{} writes, {}", r.unacked2_writes, human(r.unacked2_bytes)),
        );
        row(
            &mut o,
            "RPO (oldest)",
            &format!(
                "{} not yet durable on {}",
                age(r.oldest_not_durable_ms),
                p.peer
            ),
        );
        row(
            &mut o,
            "Replicated",
            &format!(
                "{} writes, {}; {} local-only; {} breaks",
                r.writes_replicated,
                human(r.bytes_replicated),
                r.writes_local_only,
                r.breaks
            ),
        );
    }
    row(
        &mut o,
        "Size",
        &format!("{} bytes ({})", s.size, human(s.size)),
    );
    row(&mut o, "Engine", &s.engine);
    nbd_rows(&mut o, s);
    let _ = writeln!(o, "\nNext step: {}", s.next_step);
    o
}

/// The ancestor's "Recovery Status" rows (§11.10.3).
pub fn recovery_rows(o: &mut String, r: &mirror_agent::status::RecoveryStatus) {
    let state = if r.finished {
        "finished"
    } else if r.error.is_some() {
        "stopped"
    } else if r.preparing {
        "preparing"
    } else {
        "running"
    };
    let _ = writeln!(
        o,
        "\nRecovery Status: {state} ({} resync, rule {}, this node is the {})",
        r.kind, r.rule, r.role
    );
    row(o, "  Direction", &r.direction);
    row(o, "  Percent", &recovery_progress(r));
    row(o, "  Used Time", &hms(r.elapsed_secs));
    row(
        o,
        "  Remain Time",
        &r.remaining_secs.map(hms).unwrap_or_else(|| "-".into()),
    );
    if let Some(e) = &r.error {
        row(o, "  Stopped", e);
    }
    let _ = writeln!(o);
}

/// The progress of a recovery in one phrase: "preparing (…)" while the copy
/// set is being built (its size is not known yet), else percent and bytes.
pub fn recovery_progress(r: &mirror_agent::status::RecoveryStatus) -> String {
    if r.preparing {
        return "preparing (building the region list: bitmaps merged, divergent regions saved)"
            .into();
    }
    format!(
        "{:.1}% ({} of {})",
        r.percent,
        human(r.done_bytes),
        human(r.total_bytes)
    )
}

/// A text progress bar, e.g. `[#########-----------]` for 45% at width 20.
pub fn progress_bar(percent: f64, width: usize) -> String {
    let filled = ((percent.clamp(0.0, 100.0) / 100.0) * width as f64).round() as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled),
        "-".repeat(width - filled.min(width))
    )
}

/// An age: milliseconds below 10 s (in-flight lag), else `HH:MM:SS` (writes
/// made while the mirror was broken age with the break).
fn age(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        hms(ms / 1000)
    }
}

/// `HH:MM:SS`.
pub fn hms(s: u64) -> String {
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The peer's colour as seen from here.
fn peer_color(s: &ResourceStatus, p: &PairStatus) -> String {
    if p.connection != "connected" {
        return "GRAY (unreachable)".into();
    }
    if p.peer_disk.as_ref().map(|d| d.disk_error).unwrap_or(false) || p.peer_disk_error {
        return "RED".into();
    }
    if p.in_sync {
        return if s.color == "YELLOW" {
            "YELLOW".into()
        } else {
            "GREEN".into()
        };
    }
    let newer_there = p
        .decision
        .as_deref()
        .is_some_and(|d| d.contains(&format!("resync {} ->", p.peer)));
    if newer_there {
        "GREEN".into()
    } else {
        "RED".into()
    }
}

fn percent(p: f64) -> String {
    if p > 0.0 && p < 1.0 {
        format!("{p:.2}%")
    } else {
        format!("{p:.0}%")
    }
}

/// Binary-prefixed human size.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// `YYYY/MM/DD HH:MM:SS UTC` (the ancestor's layout), or `-`.
pub fn time(t: Option<u64>) -> String {
    let Some(t) = t.filter(|&t| t > 0) else {
        return "-".into();
    };
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Civil-from-days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}/{m:02}/{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(progress_bar(0.0, 10), "[----------]");
        assert_eq!(progress_bar(45.0, 20), "[#########-----------]");
        assert_eq!(progress_bar(100.0, 10), "[##########]");
        assert_eq!(progress_bar(250.0, 4), "[####]", "clamped");
    }

    #[test]
    fn age_format() {
        assert_eq!(age(0), "0 ms");
        assert_eq!(age(9_999), "9999 ms");
        assert_eq!(age(10_000), "00:00:10");
        assert_eq!(age(3_723_000), "01:02:03");
    }

    #[test]
    fn time_format() {
        assert_eq!(time(None), "-");
        assert_eq!(time(Some(0)), "-");
        assert_eq!(time(Some(1_078_410_605)), "2004/03/04 14:30:05 UTC");
        assert_eq!(time(Some(1_795_314_600)), "2026/11/22 02:30:00 UTC");
    }

    #[test]
    fn recovery_preparing_then_running() {
        let mut r = mirror_agent::status::RecoveryStatus {
            role: "source".into(),
            direction: "server1 -> server2".into(),
            kind: "full".into(),
            rule: "R6 new-member".into(),
            preparing: true,
            percent: 0.0,
            done_bytes: 0,
            total_bytes: 0,
            elapsed_secs: 3,
            elapsed_ms: 3000,
            remaining_secs: None,
            finished: false,
            error: None,
        };
        let mut o = String::new();
        recovery_rows(&mut o, &r);
        assert!(o.contains("Recovery Status: preparing"), "{o}");
        assert!(
            o.contains("building the region list") && !o.contains("0.0%"),
            "{o}"
        );
        r.preparing = false;
        r.total_bytes = 1 << 20;
        r.done_bytes = 1 << 19;
        r.percent = 50.0;
        let mut o = String::new();
        recovery_rows(&mut o, &r);
        assert!(
            o.contains("running") && o.contains("50.0% (512.0 KiB of 1.0 MiB)"),
            "{o}"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(256 * 1024 * 1024), "256.0 MiB");
    }
}
