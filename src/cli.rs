//! Command line: `run`, `check`, `demo`, `health`, `status`.

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
        /// Take the listening sockets over from the instance named in
        /// `server.pid_file` (it gets SIGQUIT, hands them over, drains and
        /// exits): a restart or binary upgrade that refuses no connection.
        #[arg(long)]
        upgrade: bool,
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
    /// Start `run --upgrade` in the background, wait until it holds the
    /// listening sockets, print its PID and exit (systemd's `ExecReload=`).
    Upgrade {
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Watch the proxy named in `server.pid_file` from outside, and write
    /// "not ready" to `ha.track_file` the moment it dies (SIGKILL, crash),
    /// following it across `run --upgrade`. Runs until stopped.
    Watch {
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// How often the pid file is re-read while the proxy runs.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        poll: std::time::Duration,
    },
    /// Make a running instance re-read its config file (as SIGHUP does) and
    /// print what changed: exit 0 applied or unchanged, 1 refused (every
    /// error printed), 2 no answer within the timeout.
    Reload {
        /// Its admin address (`host:port` or a URL).
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Read and write the KV settings under `consul.kv_prefix`, through the
    /// Consul agent of the config's `[consul]` section. Writes are validated
    /// first (nothing is written when the proxy would reject the key) and
    /// use check-and-set.
    Kv {
        #[command(subcommand)]
        op: KvOp,
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH, global = true)]
        config: PathBuf,
    },
    /// Drain an instance of a cluster through KV: no new requests, those in
    /// flight finish. INSTANCE is a Consul service ID or `ip:port`.
    Drain {
        cluster: String,
        instance: String,
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Return once every `--admin` shows the instance drained with nothing in flight.
        #[arg(long)]
        wait: bool,
        /// Admin APIs to watch with `--wait` (repeatable); INSTANCE must then be `ip:port`.
        #[arg(long)]
        admin: Vec<String>,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Undo `drain`: delete the instance's KV key.
    Undrain {
        cluster: String,
        instance: String,
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Turn a route's maintenance mode on or off through KV.
    Maintenance {
        route: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long)]
        body: Option<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        retry_after: Option<std::time::Duration>,
        #[arg(short, long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Ask a running instance whether it is ready: exit 0 ready, 1 not ready
    /// (reasons printed), 2 no answer within the timeout.
    Health {
        /// Its admin address (`host:port` or a URL).
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// VRRP readiness (`/readyz?vrrp`): may this node hold a floating address?
        #[arg(long)]
        vrrp: bool,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show a running instance's table generation and digest; with
    /// `--compare A B`, whether two nodes serve the same table and where they
    /// differ (exit 0 same, 1 different, 2 no answer).
    Status {
        /// Its admin address (`host:port` or a URL).
        #[arg(long, default_value = "127.0.0.1:9901", conflicts_with = "compare")]
        admin: String,
        #[arg(long, num_args = 2, value_names = ["ADMIN_A", "ADMIN_B"])]
        compare: Option<Vec<String>>,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum KvOp {
    /// Every key under the prefix, with the proxy's verdict on each.
    List,
    /// One key's value (relative to the prefix).
    Get { key: String },
    /// Validate, then write with check-and-set.
    Set { key: String, value: String },
    /// Validate (the other keys must still apply), then delete with check-and-set.
    Delete { key: String },
}
