//! `sg-bench`: runs sensorgate's standard benchmark scenarios against a release build, with
//! mosquitto (and for scenario 8 RabbitMQ) on loopback, and prints a table, a targets summary
//! and (with `--json`) JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use sensorgate_bench::suite::{self, Options};

#[derive(Parser, Debug)]
#[command(about = "sensorgate benchmark suite (scenarios 1-19)")]
struct Args {
    /// Smaller sizes (a smoke run of a minute or so).
    #[arg(long)]
    quick: bool,
    /// Scenarios to run, comma-separated, in this order (default: all nineteen). 1: QoS 0 one
    /// client, unpaced and paced; 2, 10, 3: QoS 1 window 1 from 1, 100, 1,000 clients; 4:
    /// connect storm; 5: idle + active clients; 6: downlink fan-out; 7: spool drain; 8: QoS 1
    /// to RabbitMQ; 9: uplink fan-out disk bytes; 11: CoAP CON PUT, 1,000 devices (beside 3
    /// when it ran before); 12: CoAP NON PUT paced at 100,000 msg/s; 13: CoAP Observe fan-out;
    /// 14: HTTP QoS 1 publish, 100 keep-alive connections (beside 3 and 10 when they ran
    /// before); 15: HTTP batches of 1,000 QoS 1 readings, 10 connections; 16: serial QoS 1
    /// over a pty, unthrottled; 17: the same paced at 115200 8N1; 18: MQTT-SN QoS 1 and QoS 0
    /// over DTLS-PSK beside plain UDP; 19: 10,000 DTLS-PSK handshakes + CONNECT, 64 in flight.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19"
    )]
    only: Vec<u8>,
    /// Payload bytes per message (at least 20: client, sequence, send time).
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// `[http] worker_threads` of the HTTP scenarios' gateways (14, 15); default: the
    /// gateway's own (1, a current-thread runtime).
    #[arg(long)]
    http_workers: Option<usize>,
    /// The sensorgate binary (default: next to this one).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// (Internal) one generator process of a connect storm, driven over stdin/stdout.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        gateway: SocketAddr,
        #[arg(long)]
        clients: usize,
        #[arg(long)]
        first_index: u32,
        #[arg(long, default_value_t = 32)]
        payload: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Cmd::Worker {
        gateway,
        clients,
        first_index,
        payload,
    }) = args.command
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let spec = sensorgate_bench::storm::storm_spec(gateway, clients, first_index, payload);
        return runtime.block_on(sensorgate_bench::storm::worker(spec));
    }
    let gateway_bin = match args.gateway_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("sensorgate"),
    };
    let opts = Options {
        gateway_bin,
        only: args.only,
        quick: args.quick,
        payload: args.payload.max(sensorgate_bench::sn::STAMP_LEN),
        http_workers: args.http_workers,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(suite::run(opts))?;
    suite::print_targets(&report);
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = args.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON report: {}", path.display());
    }
    // Missed targets are findings; a scenario that could not run is a failure.
    let failed: Vec<u8> = report
        .scenarios
        .iter()
        .filter(|s| s.failed)
        .map(|s| s.id)
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("scenario(s) {failed:?} could not run");
    }
    Ok(())
}
