//! Wiring: binds the listeners, starts the upstreams and the MQTT-SN driver, and stops them in
//! order on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use sensorgate_bridges::mqtt::{MqttUpstream, SetupError};
use sensorgate_bridges::spool::{
    DrainConfig, DrainStats, OpenError, SharedSpool, Spool, StdFs, drain, start_writer,
};

use crate::config::{Config, UpstreamKind};
use crate::io::udp::{self, SocketOptions, UdpDriver};
use crate::mqttsn::core::Core;

/// How long stopping tasks may take before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bound of the channel carrying the spool's verdicts (batches) to the core.
const REPLY_CHANNEL: usize = 1024;

/// Bound of the channel carrying downlink messages from the upstreams to the core; when full,
/// the upstream connections wait (backpressure toward the brokers).
const DOWNLINK_CHANNEL: usize = 4096;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("cannot bind MQTT-SN listener {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// An upstream could not be set up (TLS files and the like).
    #[error("upstream `{name}`: {source}")]
    Upstream {
        /// The upstream's name.
        name: String,
        /// What went wrong.
        source: SetupError,
    },
    /// The spool could not be opened (locked by another process, unreadable).
    #[error("{0}")]
    Spool(#[from] OpenError),
    /// The spool writer thread could not start.
    #[error("cannot start the spool writer: {0}")]
    SpoolWriter(std::io::Error),
    /// The MQTT-SN transport failed.
    #[error("MQTT-SN transport failed: {0}")]
    Transport(std::io::Error),
}

/// Runs the gateway until `shutdown` is cancelled.
///
/// # Errors
/// [`RunError`] when start-up fails or a listener dies.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    let (spool, recovery) = Spool::open(StdFs, config.spool.spool.clone(), &names)?;
    tracing::info!(
        dir = %config.spool.spool.dir.display(),
        segments = recovery.segments,
        records = recovery.records,
        corrupt = recovery.corrupt,
        truncated_bytes = recovery.truncated_bytes,
        next_seq = recovery.next_seq,
        "Spool opened."
    );
    let spool = SharedSpool::new(spool);
    for (index, name) in names.iter().enumerate() {
        let backlog = spool.lock().backlog(index);
        if backlog > 0 {
            tracing::info!(upstream = %name, backlog, "Spooled messages to forward.");
        }
    }
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_CHANNEL);
    let (appender, writer) = start_writer(Arc::clone(&spool), config.spool.queue, reply_tx)
        .map_err(RunError::SpoolWriter)?;

    let upstream_stop = CancellationToken::new();
    let drain_stop = CancellationToken::new();
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_CHANNEL);
    let mut upstreams = Vec::new();
    let mut tasks = Vec::new();
    let mut drains = Vec::new();
    for (index, upstream) in config.upstreams.iter().enumerate() {
        let UpstreamKind::Mqtt(mqtt) = &upstream.kind;
        let window = usize::from(mqtt.max_inflight);
        let (ack_tx, ack_rx) = mpsc::channel(window + 16);
        let spawned = MqttUpstream::spawn_with_downlink(
            index,
            mqtt.clone(),
            ack_tx,
            Some(downlink_tx.clone()),
            upstream_stop.clone(),
        );
        let (handle, task) = match spawned {
            Ok(spawned) => spawned,
            Err(source) => {
                upstream_stop.cancel();
                return Err(RunError::Upstream {
                    name: upstream.name.clone(),
                    source,
                });
            }
        };
        let drain_config = DrainConfig {
            window,
            rate_msgs: config.spool.drain_rate,
            rate_bytes: config.spool.drain_bytes_rate,
            ack_timeout: upstream.ack_timeout,
        };
        drains.push(tokio::spawn(drain(
            Arc::clone(&spool),
            index,
            handle.clone(),
            ack_rx,
            drain_config,
            Arc::new(DrainStats::default()),
            drain_stop.clone(),
        )));
        upstreams.push(handle);
        tasks.push(task);
    }
    drop(downlink_tx);

    // Upstreams start first (their setup errors come before any port is taken); a bind failure
    // stops them again.
    let options = SocketOptions {
        recv_buffer: config.mqttsn.recv_buffer,
        send_buffer: config.mqttsn.send_buffer,
    };
    let mut sockets = Vec::new();
    for &addr in &config.mqttsn.listen {
        match udp::bind(addr, options) {
            Ok(socket) => sockets.push(socket),
            Err(source) => {
                upstream_stop.cancel();
                return Err(RunError::Bind { addr, source });
            }
        }
    }

    let core = Core::new(config.mqttsn.core.clone());
    let driver = UdpDriver::new(
        core,
        sockets,
        upstreams,
        appender,
        reply_rx,
        downlink_rx,
        config.mqttsn.recv_batch,
        config.mqttsn.core.max_packet_size,
    );
    tracing::info!(listeners = config.mqttsn.listen.len(), "sensorgate ready.");
    let result = driver.run(shutdown).await.map_err(RunError::Transport);

    // The driver has stopped and dropped its appender: the writer writes, syncs and ends.
    // Then the drains stop sending and the upstreams settle what is in flight; the cursors
    // are saved last, so a restart resends as little as possible.
    let writer_done = tokio::task::spawn_blocking(move || writer.join());
    if tokio::time::timeout(SHUTDOWN_GRACE, writer_done)
        .await
        .is_err()
    {
        tracing::warn!("Spool writer did not stop within the grace period.");
    }
    drain_stop.cancel();
    upstream_stop.cancel();
    let stop_all = async {
        for task in drains {
            let _ = task.await;
        }
        for task in tasks {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, stop_all)
        .await
        .is_err()
    {
        tracing::warn!("Upstreams did not stop within the grace period.");
    }
    if let Err(error) = spool.lock().save_cursors() {
        tracing::warn!(%error, "Cannot save the spool cursors.");
    }
    result
}
