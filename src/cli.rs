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
    /// The daemon: set up like `apply`, then serve reloads, the control socket, metrics and
    /// health checks (`sd_notify` for systemd `Type=notify`)
    Run,
    /// Ask the running daemon to reload (exit 0 ok, 2 refused file, 1 daemon not reachable)
    Reload {
        /// Control socket (default: `[control] socket` of the settings file)
        #[arg(long, env = "BRDIVERT_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Show the running daemon's rules, counters, health, dr bucket shares and last reload
    Status {
        /// Machine-readable JSON
        #[arg(long)]
        json: bool,
        /// Control socket (default: `[control] socket` of the settings file)
        #[arg(long, env = "BRDIVERT_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// The running daemon's allow list of queue decisions: new flows from or to these
    /// prefixes are never diverted (`decide = "queue"` rules only; kept in memory)
    Allow {
        #[command(subcommand)]
        op: ListOp,
        /// Control socket (default: `[control] socket` of the settings file)
        #[arg(long, env = "BRDIVERT_SOCKET", global = true)]
        socket: Option<PathBuf>,
    },
    /// The running daemon's deny list of queue decisions: new flows from or to these
    /// prefixes are dropped (`decide = "queue"` rules only; kept in memory)
    Deny {
        #[command(subcommand)]
        op: ListOp,
        /// Control socket (default: `[control] socket` of the settings file)
        #[arg(long, env = "BRDIVERT_SOCKET", global = true)]
        socket: Option<PathBuf>,
    },
    /// The throw-away network-namespace lab
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListOp {
    /// Add an address or prefix
    Add { prefix: String },
    /// Remove a prefix
    Del { prefix: String },
    /// Show the list
    List,
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
        // no colour codes in the journal or in log files
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::Run => crate::daemon::run(cfg),
        Command::Reload { socket } => client_reload(&control_socket(cfg, socket)),
        Command::Status { json, socket } => client_status(&control_socket(cfg, socket), *json),
        Command::Allow { op, socket } => client_list(&control_socket(cfg, socket), "allow", op),
        Command::Deny { op, socket } => client_list(&control_socket(cfg, socket), "deny", op),
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

/// The control socket: `--socket`, else `[control] socket` read leniently from the settings
/// file (a reload is often wanted exactly when that file has an error elsewhere), else the
/// default.
fn control_socket(cfg: &std::path::Path, explicit: &Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p.clone();
    }
    let from_file = std::fs::read_to_string(cfg)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("control")?.get("socket")?.as_str().map(PathBuf::from));
    from_file.unwrap_or_else(|| crate::settings::ControlSettings::default().socket)
}

fn unreachable(path: &std::path::Path, e: std::io::Error) -> Failure {
    Failure::Runtime(anyhow::anyhow!(
        "daemon not reachable on {}: {e} (is `brdivert run` running?)",
        path.display()
    ))
}

/// A long timeout: a reload waits for one in progress and for the kernel transaction.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn client_reload(path: &std::path::Path) -> Result<String, Failure> {
    let resp = crate::daemon::control::request(path, "reload", CLIENT_TIMEOUT)
        .map_err(|e| unreachable(path, e))?;
    let Some(r) = resp.reload else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "daemon: {}",
            resp.error.unwrap_or_else(|| "no reload result".into())
        )));
    };
    let text = format!("reload {}: {}", r.result, r.message);
    match r.result.as_str() {
        "ok" => Ok(text),
        "refused" => Err(Failure::Refused(text)),
        _ => Err(Failure::Runtime(anyhow::anyhow!("{text}"))),
    }
}

fn client_list(path: &std::path::Path, cmd: &str, op: &ListOp) -> Result<String, Failure> {
    let (op, prefix) = match op {
        ListOp::Add { prefix } => ("add", Some(prefix.clone())),
        ListOp::Del { prefix } => ("del", Some(prefix.clone())),
        ListOp::List => ("list", None),
    };
    let req = crate::daemon::control::Request {
        cmd: cmd.into(),
        op: Some(op.into()),
        prefix,
    };
    let resp = crate::daemon::control::request_with(path, &req, CLIENT_TIMEOUT)
        .map_err(|e| unreachable(path, e))?;
    match resp.list {
        Some(l) => Ok(l.join("\n")),
        None => Err(Failure::Refused(format!(
            "daemon: {}",
            resp.error.unwrap_or_else(|| "no answer".into())
        ))),
    }
}

fn client_status(path: &std::path::Path, json: bool) -> Result<String, Failure> {
    let resp = crate::daemon::control::request(path, "status", CLIENT_TIMEOUT)
        .map_err(|e| unreachable(path, e))?;
    let Some(st) = resp.status else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "daemon: {}",
            resp.error.unwrap_or_else(|| "no status".into())
        )));
    };
    if json {
        serde_json::to_string_pretty(&st).map_err(|e| Failure::Runtime(e.into()))
    } else {
        Ok(crate::daemon::control::format_status(&st))
    }
}
