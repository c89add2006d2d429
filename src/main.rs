//! The binary shell: CLI, logging, config, run. An invalid config exits 64
//! (EX_USAGE-style "data error") with every error listed and nothing started.

use clap::Parser;
use std::process::ExitCode;
use switchyard::cli::{Cli, Command, KvOp, LogFormatArg};
use switchyard::{config, demo, kvcli, ops, server};

const EXIT_CONFIG: u8 = 64;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Crates whose debug and trace output prints whole HTTP heads — clients'
/// cookies and `Authorization`, the admin bearer token — so it is never
/// written, whatever `--log-level` asks for.
const HEADER_DUMPING_CRATES: [&str; 5] = ["pingora", "h2", "hyper", "reqwest", "tower"];

fn init_logging(cli: &Cli) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let no_header_dumps = tracing_subscriber::filter::filter_fn(|m| {
        *m.level() <= tracing::Level::INFO || !HEADER_DUMPING_CRATES.iter().any(|c| m.target().starts_with(c))
    });
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let layer = match cli.log_format {
        LogFormatArg::Text => layer.boxed(),
        LogFormatArg::Json => layer.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry().with(layer.with_filter(filter).with_filter(no_header_dumps)).init();
}

fn load(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|errs| {
        eprintln!("{}: {} error(s):", path.display(), errs.0.len());
        for e in &errs.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Check { config } => match load(config) {
            Ok(c) => {
                println!("{}: ok", config.display());
                print!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Upgrade { config, timeout } => {
            let c = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match switchyard::ha::spawn_upgrade(config, std::path::Path::new(&c.server.pid_file), *timeout) {
                Ok(pid) => {
                    println!("upgraded: pid {pid} holds the sockets");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("switchyard upgrade: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Watch { config, poll } => {
            let c = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(track) = c.ha.track_file.clone() else {
                eprintln!("{}: ha.track_file: `switchyard watch` needs a track file to write", config.display());
                return ExitCode::from(EXIT_CONFIG);
            };
            init_logging(&cli);
            match switchyard::ha::watch(std::path::Path::new(&c.server.pid_file), &track, *poll) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("switchyard watch: {}: {e}", track.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Kv { op, config } => ExitCode::from(match op {
            KvOp::List => kvcli::list(config),
            KvOp::Get { key } => kvcli::get(config, key),
            KvOp::Set { key, value } => kvcli::set(config, key, value),
            KvOp::Delete { key } => kvcli::delete(config, key),
        }),
        Command::Drain { cluster, instance, config, wait, admin, timeout } => {
            ExitCode::from(kvcli::drain(config, cluster, instance, true, *wait, admin, *timeout))
        }
        Command::Undrain { cluster, instance, config } => {
            ExitCode::from(kvcli::drain(config, cluster, instance, false, false, &[], std::time::Duration::ZERO))
        }
        Command::Maintenance { route, state, body, retry_after, config } => {
            ExitCode::from(kvcli::maintenance(config, route, state == "on", body.as_deref(), *retry_after))
        }
        Command::Reload { admin, timeout } => ExitCode::from(ops::reload(admin, *timeout)),
        Command::Health { admin, vrrp, timeout } => ExitCode::from(ops::health(admin, *vrrp, *timeout)),
        Command::Status { admin, compare, timeout } => {
            let admins = compare.clone().unwrap_or_else(|| vec![admin.clone()]);
            ExitCode::from(ops::status(&admins, *timeout))
        }
        Command::Run { config, upgrade } => {
            let c = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&cli);
            tracing::info!(config = %config.display(), version = env!("CARGO_PKG_VERSION"), "starting");
            let extras = server::Extras {
                upgrade: *upgrade,
                config_path: Some(config.clone()),
                ..Default::default()
            };
            match server::run(c, extras) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("switchyard: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { listen, admin, dir } => {
            let dir = match dir {
                Some(d) => {
                    if let Err(e) = std::fs::create_dir_all(d) {
                        eprintln!("switchyard: cannot create {}: {e}", d.display());
                        return ExitCode::FAILURE;
                    }
                    d.clone()
                }
                None => match tempfile::Builder::new().prefix("switchyard-demo-").tempdir() {
                    Ok(t) => t.keep(),
                    Err(e) => {
                        eprintln!("switchyard: cannot create a temp dir: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let d = match demo::prepare(&dir, *listen, *admin) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("switchyard: cannot write demo files in {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
            };
            let c = match load(&d.config_path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&cli);
            println!("{}", d.instructions(*listen, *admin));
            let extras = server::Extras {
                config_path: Some(d.config_path.clone()),
                ..d.extras()
            };
            match server::run(c, extras) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("switchyard: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
