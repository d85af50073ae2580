//! Wiring: binds the listeners, starts the upstreams and the MQTT-SN driver, and stops them in
//! order on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use sensorgate_bridges::mqtt::{MqttUpstream, SetupError};

use crate::config::{Config, UpstreamKind};
use crate::io::udp::{self, SocketOptions, UdpDriver};
use crate::mqttsn::core::Core;

/// How long stopping tasks may take before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bound of the channel carrying upstream acknowledgements to the core.
const ACK_CHANNEL: usize = 65_536;

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
    /// The MQTT-SN transport failed.
    #[error("MQTT-SN transport failed: {0}")]
    Transport(std::io::Error),
}

/// Runs the gateway until `shutdown` is cancelled.
///
/// # Errors
/// [`RunError`] when start-up fails or a listener dies.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let upstream_stop = CancellationToken::new();
    let (ack_tx, ack_rx) = mpsc::channel(ACK_CHANNEL);
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_CHANNEL);
    let mut upstreams = Vec::new();
    let mut tasks = Vec::new();
    for (index, upstream) in config.upstreams.iter().enumerate() {
        let UpstreamKind::Mqtt(mqtt) = &upstream.kind;
        let spawned = MqttUpstream::spawn_with_downlink(
            index,
            mqtt.clone(),
            ack_tx.clone(),
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
        upstreams.push(handle);
        tasks.push(task);
    }
    drop(ack_tx);
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
        ack_rx,
        downlink_rx,
        config.mqttsn.recv_batch,
        config.mqttsn.core.max_packet_size,
    );
    tracing::info!(listeners = config.mqttsn.listen.len(), "sensorgate ready.");
    let result = driver.run(shutdown).await.map_err(RunError::Transport);

    // Sources first (the driver has stopped), then the sinks.
    upstream_stop.cancel();
    let stop_all = async {
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
    result
}
