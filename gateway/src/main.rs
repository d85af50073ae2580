//! The `sensorgate` daemon: CLI, config, logging, runtime and signals only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sensorgate::config::{self, Config, LoadError};

/// Exit status for configuration errors (EX_CONFIG, sysexits.h).
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "sensorgate",
    version,
    about = "MQTT-SN gateway and protocol bridge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// Config file.
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a config file, print a summary, and exit (78 on errors).
    CheckConfig {
        /// Config file.
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!("config OK: {}", config.display());
                print!("{}", cfg.summary());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            init_logging(&cfg.log.level);
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "sensorgate stopped.");
                    eprintln!("sensorgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(e: &LoadError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EX_CONFIG)
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn run(cfg: Config) -> anyhow::Result<()> {
    // One thread runs every task: the UDP driver, the upstream link and acknowledgement tasks
    // hand each message to one another several times, and on one thread each hand-over is a
    // queue push instead of a cross-thread wake-up (futex) of a parked worker. The core is
    // single-owner anyway, so more workers add wake-ups, not parallelism.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("sensorgate")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %cfg.file.display(), "sensorgate starting.");
        for line in cfg.summary().lines() {
            tracing::info!("{line}");
        }
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("Shutdown requested.");
            signals.cancel();
        });
        sensorgate::app::run(cfg, shutdown).await?;
        tracing::info!("sensorgate stopped.");
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon can only be killed; keep running.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
