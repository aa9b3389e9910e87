//! `cargo run --release -p vm-harness -- SCENARIO`: real-kernel scenarios
//! (`/dev/nbdX` under a QEMU/TCG guest).
//!
//! Status: the scenarios (`failover`, `partition`, `stall`) are specified in
//! issue 6 and not built yet; this binary says so instead of pretending. The
//! proven recipes it will grow from are in `../shared/reference/vm-recipe/`.

use std::process::ExitCode;

use clap::Parser;

/// Scenarios this harness will run, with one line each.
const SCENARIOS: &[(&str, &str)] = &[
    ("failover", "node A in a guest with /dev/nbd0 + ext4, killed hard; node B forced, verified; A returns and resyncs"),
    ("partition", "link between the nodes cut and healed during a write stream; auto recovery converges"),
    ("stall", "active agent SIGSTOPped shorter than the kernel timeout; the guest sees no error"),
];

/// Real-kernel scenarios for nbd-mirror under QEMU (TCG).
#[derive(Debug, Parser)]
#[command(name = "vm-harness")]
struct Args {
    /// Scenario to run; `list` prints them.
    scenario: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.scenario == "list" {
        for (name, what) in SCENARIOS {
            println!("{name:<10} {what}");
        }
        return ExitCode::SUCCESS;
    }
    match SCENARIOS.iter().find(|(n, _)| *n == args.scenario) {
        Some((name, _)) => {
            eprintln!("FAIL: scenario {name}: not implemented yet (tracked by the real-kernel issue); nothing was run");
            ExitCode::from(2)
        }
        None => {
            eprintln!("vm-harness: unknown scenario {:?}; `vm-harness list` shows them", args.scenario);
            ExitCode::from(2)
        }
    }
}
