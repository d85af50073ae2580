//! `[gateway]` (identity and state directory) and `[log]`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::check::int_in;
use super::diag::{KeyPath, Reporter};

/// `[gateway]`.
#[derive(Debug, Clone)]
pub struct GatewaySection {
    /// MQTT-SN GwId.
    pub id: u8,
    /// Name used in logs and the default upstream client id.
    pub name: String,
    /// Where durable state lives.
    pub state_dir: PathBuf,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogSection {
    /// A `tracing` filter directive (`info`, `sensorgate=debug,warn`); `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawGateway {
    id: i64,
    name: String,
    state_dir: String,
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            id: 1,
            name: "sensorgate".into(),
            state_dir: "/var/lib/sensorgate".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawLog {
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
        }
    }
}

impl RawGateway {
    /// `state_dir`, relative to the config file's directory `base`.
    pub(super) fn state_dir(&self, base: &Path) -> PathBuf {
        base.join(&self.state_dir)
    }
}

/// `[gateway]`; `None` when a key is wrong (reported).
pub(super) fn compile_gateway(
    raw: &RawGateway,
    state_dir: PathBuf,
    r: &mut Reporter<'_>,
) -> Option<GatewaySection> {
    let gw = KeyPath::root("gateway");
    let gw_id = int_in::<u8>(r, &gw.key("id"), raw.id, 0, 255);
    if raw.name.is_empty() {
        r.at_path(&gw.key("name"), "must not be empty".into(), None);
    }
    if raw.state_dir.is_empty() {
        r.at_path(&gw.key("state_dir"), "must not be empty".into(), None);
    }
    Some(GatewaySection {
        id: gw_id?,
        name: raw.name.clone(),
        state_dir,
    })
}

/// `[log]`: the filter is checked (reported when wrong) and kept as written.
pub(super) fn compile_log(raw: RawLog, r: &mut Reporter<'_>) -> LogSection {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.level) {
        r.at_path(
            &KeyPath::root("log").key("level"),
            format!("invalid log filter `{}`: {e}", raw.level),
            Some(
                "use `error`, `warn`, `info`, `debug`, `trace`, or `sensorgate=debug,info`".into(),
            ),
        );
    }
    LogSection { level: raw.level }
}
