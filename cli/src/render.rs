//! The `clpmdstat --mirror`-style status table.

use std::fmt::Write;

use mirror_agent::status::{ResourceStatus, Role};

/// Render one resource's status as the operator's table.
pub fn status_table(s: &ResourceStatus) -> String {
    let mut o = String::new();
    let mirror_status = match (&s.peer, s.color.as_str()) {
        (None, "GREEN") => "Standalone (no peer configured)".to_string(),
        (None, _) => "Standalone, local disk needs attention".to_string(),
        (Some(_), "GREEN") => "Normal".to_string(),
        (Some(_), "YELLOW") => "Recovering".to_string(),
        (Some(_), _) => format!("Abnormal Total Difference: {}", percent(s.disk.difference_percent)),
    };
    let _ = writeln!(o, "Mirror Status: {mirror_status}\n");
    let row = |o: &mut String, k: &str, v: &str| {
        let _ = writeln!(o, "{k:<20}{v}");
    };
    row(&mut o, &s.resource, &s.node);
    row(&mut o, "Mirror Color", &s.color);
    row(&mut o, "Role", match s.role {
        Role::Active => "Active",
        Role::Inactive => "Inactive",
    });
    row(&mut o, "Lastupdate Time", &time(s.disk.last_update));
    row(&mut o, "Break Time", &time(s.disk.break_time));
    row(&mut o, "Disk Error", if s.disk.disk_error { "ERROR" } else { "OK" });
    if s.peer.is_some() {
        row(&mut o, "Difference Percent", &percent(s.disk.difference_percent));
    } else {
        // Without a peer nothing is mirrored: the bitmap has no meaning yet.
        row(&mut o, "Difference Percent", "n/a (standalone)");
    }
    row(&mut o, "Consistent", if s.disk.consistent { "yes" } else { "NO (resync target)" });
    row(&mut o, "Size", &format!("{} bytes ({})", s.size, human(s.size)));
    row(&mut o, "Mode", &s.mode);
    row(&mut o, "Engine", &s.engine);
    row(&mut o, "Generation", &s.disk.current_generation);
    match (&s.nbd_socket, &s.nbd_tcp) {
        (Some(sock), tcp) => row(&mut o, "NBD export", &format!("{sock}{}", tcp.as_ref().map(|t| format!(", tcp {t}")).unwrap_or_default())),
        (None, _) => row(&mut o, "NBD export", "- (not active)"),
    }
    row(
        &mut o,
        "NBD connections",
        &format!("{} open, {} since start", s.nbd.connections_open, s.nbd.connections_total),
    );
    row(
        &mut o,
        "NBD requests",
        &format!(
            "{} served, {} errors, {} read, {} written",
            s.nbd.requests,
            s.nbd.errors,
            human(s.nbd.read_bytes),
            human(s.nbd.written_bytes)
        ),
    );
    let _ = writeln!(o, "\nNext step: {}", s.next_step);
    o
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
    let Some(t) = t.filter(|&t| t > 0) else { return "-".into() };
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
    format!("{y:04}/{m:02}/{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(time(None), "-");
        assert_eq!(time(Some(0)), "-");
        assert_eq!(time(Some(1_078_410_605)), "2004/03/04 14:30:05 UTC");
        assert_eq!(time(Some(1_795_314_600)), "2026/11/22 02:30:00 UTC");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(256 * 1024 * 1024), "256.0 MiB");
    }
}
