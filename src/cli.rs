//! Command line: `run`, `check`, `demo`.

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about = "Edge HTTP load balancer that follows your service catalog without reloads")]
pub struct Cli {
    /// Log output format (diagnostic logs, on stderr).
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text, global = true)]
    pub log_format: LogFormatArg,
    /// Log level or filter, e.g. `info`, `debug`, `switchyard=debug,pingora=warn`.
    #[arg(long, default_value = "info", env = "SWITCHYARD_LOG", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy.
    Run {
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file: print a summary, or every error (exit 64).
    Check {
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run a self-contained demo: two sample upstreams and a file catalog.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Directory for the demo's catalog, config and access log (default: a new temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}
