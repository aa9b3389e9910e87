//! The README's first command: `mdctrl demo` runs end to end (two agents,
//! replication, standby killed, automatic recovery, identical data files).

use std::process::Command;
use std::time::Duration;

use tests::run::{all_output, cmdline, describe, run};

#[test]
fn mdctrl_demo_runs_end_to_end() {
    let mut cmd = Command::new(tests::bins::mdctrl());
    cmd.arg("demo");
    let line = cmdline(&cmd);
    let out = run(&mut cmd, Duration::from_secs(180));
    assert!(out.status.success(), "{}", describe(&line, &out));
    let text = all_output(&out);
    for expect in [
        "mirroring to server2",
        "unreachable",
        "server2 is not connected: its column is what it last reported",
        "Recovery Status",
        "data files identical on both nodes",
        "demo finished",
    ] {
        assert!(
            text.contains(expect),
            "demo output lacks {expect:?}\n{}",
            describe(&line, &out)
        );
    }
}
