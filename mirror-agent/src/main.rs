//! `mirror-agent --config FILE --node NAME`: runs the nbd-mirror daemon for one
//! node in the foreground, logging to stderr (`RUST_LOG` adjusts the filter).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The nbd-mirror agent: serves this node's resources (NBD export, mirror
/// link, cluster partition) and answers `mdctrl` on the admin socket.
#[derive(Debug, Parser)]
#[command(name = "mirror-agent", version)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, default_value = mirror_agent::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// This node's name, as declared by a `[[server]]` of the config (default: the host name).
    #[arg(long)]
    node: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let node = args
        .node
        .unwrap_or_else(mirror_agent::config::default_node_name);
    match mirror_agent::daemon::run(&args.config, &node) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirror-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
