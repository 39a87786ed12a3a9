//! Command line: flags are declared once here and rendered into `--help`.
//!
//! Exit codes: 0 success, 2 bad input (with file:line:column), 1 runtime failure.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::ops::{self, Failure};
use crate::settings::DEFAULT_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "brdivert",
    version,
    about = "Transparent bridge that diverts selected IP flows into the host's own stack"
)]
pub struct Cli {
    /// Settings file
    #[arg(short = 'c', long = "config", global = true, env = "BRDIVERT_CONFIG", default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate settings and rule files, probe the kernel, print the plan
    Check,
    /// Print the nftables ruleset that would be applied (nft syntax)
    Render,
    /// Set up the bridge and apply the rules once, no daemon (kernel datapath)
    Apply,
    /// Remove everything brdivert created (its tables, routing entries, its bridge if created)
    Flush,
    /// The throw-away network-namespace lab
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabAction {
    /// Build the lab and leave it running
    Up,
    /// Remove a lab built by `lab up`
    Down {
        /// The lab's name prefix, as `lab up` printed it
        prefix: String,
    },
    /// Build the lab, show one flow diverted through Squid and one bridged, tear down
    Demo,
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRDIVERT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&cli) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{}", out.trim_end());
            }
            0
        }
        Err(f) => {
            eprintln!("{f}");
            f.exit_code()
        }
    }
}

fn run(cli: &Cli) -> Result<String, Failure> {
    let cfg = &cli.config;
    match &cli.command {
        Command::Check => ops::check(cfg),
        Command::Render => ops::render_text(cfg),
        Command::Apply => ops::apply(cfg),
        Command::Flush => ops::flush(cfg),
        Command::Lab { action } => {
            let exe = std::env::current_exe().map_err(anyhow::Error::from)?;
            match action {
                LabAction::Up => crate::lab::up(&exe).map(|_| String::new()),
                LabAction::Down { prefix } => crate::lab::down(prefix).map(|_| String::new()),
                LabAction::Demo => crate::lab::demo(&exe).map(|_| String::new()),
            }
            .map_err(Failure::Runtime)
        }
    }
}
