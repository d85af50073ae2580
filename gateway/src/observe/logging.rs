//! Logging: where the `tracing` events go, and the level filter that can change while running.
//!
//! Invariants:
//! - Output is journald (native records: each event's fields kept as journal fields) when
//!   systemd connected stderr to the journal, i.e. when `JOURNAL_STREAM` names stderr's
//!   device and inode (the rule of systemd.exec(5), [`journal_stream_matches`]); otherwise
//!   human-readable lines on stderr (colours only on a terminal). A journald socket that
//!   cannot be opened falls back to stderr, said once in the log.
//! - The filter is an `EnvFilter` (directives such as `info,sensorgate::mqttsn=debug`) behind
//!   a reload layer: [`LogControl::set_level`] swaps it without a restart.
//! - `RUST_LOG`, when set and valid, wins over `[log] level`: at start and on every reload
//!   (a reload then validates the new level, keeps `RUST_LOG`'s and says so: `set_level`
//!   refuses with that reason).
//! - Nothing here panics: an invalid filter falls back to `info` at start and is refused
//!   (with the reason) on reload.
//!
//! Journal fields: tracing-journald upper-cases field names and prefixes them with `F_`
//! (`client_id` becomes `F_CLIENT_ID`, so `journalctl -u sensorgate F_CLIENT_ID=s1` works);
//! `MESSAGE`, `PRIORITY` (error 3 ... trace 7), `TARGET`, `CODE_FILE`, `CODE_LINE` and
//! `SYSLOG_IDENTIFIER=sensorgate` are set too.

use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The filter used when neither `RUST_LOG` nor the configured level parses.
const FALLBACK_LEVEL: &str = "info";

/// Changes the running log filter; cheap to clone, shared by whoever reloads the config.
#[derive(Clone)]
pub struct LogControl {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swaps the filter in the installed subscriber (a weak reference: no-op once it is gone).
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives in force (`RUST_LOG`'s when it wins).
    level: Mutex<String>,
    /// `RUST_LOG`, when set and valid: it wins over the config on every reload.
    env_override: Option<String>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("level", &self.level())
            .field("env_override", &self.inner.env_override)
            .finish()
    }
}

impl LogControl {
    /// Sets the filter to `level` (EnvFilter syntax, as `[log] level`).
    ///
    /// When `RUST_LOG` was set at start, it stays in force: `level` is validated, then refused
    /// with a message saying so (the reload reports it: the level did not change).
    ///
    /// # Errors
    /// The parser's message when `level` is not a valid filter; that `RUST_LOG` wins; or that
    /// the subscriber is gone. Nothing changes then.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        if let Some(env) = &self.inner.env_override {
            return Err(format!(
                "not applied: RUST_LOG={env:?} is set and wins over [log] level (unset it to \
                 change the level on reload)"
            ));
        }
        self.inner
            .handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        *self
            .inner
            .level
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = level.to_owned();
        Ok(())
    }

    /// The filter in force (`RUST_LOG`'s when it wins).
    #[must_use]
    pub fn level(&self) -> String {
        self.inner
            .level
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `RUST_LOG`'s value when it overrides `[log] level` (then [`Self::set_level`] refuses).
    #[must_use]
    pub fn env_override(&self) -> Option<&str> {
        self.inner.env_override.as_deref()
    }
}

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Native journald records.
    Journald,
    /// Text lines on stderr.
    Stderr,
}

/// Installs the global subscriber: the filter from `RUST_LOG` (when set and valid) or
/// `level`, the output per [`output_for`]. Called once, before the runtime starts; a second
/// call installs nothing and returns a control that changes nothing.
pub fn init(level: &str) -> LogControl {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, control) = filter_layer(level, rust_log.as_deref());
    let wanted = output_for(std::env::var("JOURNAL_STREAM").ok().as_deref(), stderr_id());
    let (journald, journald_error) = match wanted {
        Output::Journald => match tracing_journald::layer() {
            Ok(layer) => (Some(layer), None),
            Err(error) => (None, Some(error)),
        },
        Output::Stderr => (None, None),
    };
    // Colours only on a terminal: log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
    });
    let installed = Registry::default()
        .with(filter)
        .with(journald)
        .with(text)
        .try_init()
        .is_ok();
    if installed {
        if let Some(error) = journald_error {
            tracing::warn!(%error, "Cannot open the journald socket; logging to stderr.");
        }
        if let Some(env) = control.env_override() {
            tracing::info!(rust_log = %env, "RUST_LOG overrides [log] level.");
        }
    }
    control
}

/// The reloadable filter layer and its control: `RUST_LOG` when set and valid, else `level`,
/// else [`FALLBACK_LEVEL`].
fn filter_layer(
    level: &str,
    rust_log: Option<&str>,
) -> (reload::Layer<EnvFilter, Registry>, LogControl) {
    let from_env = rust_log
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::try_new(s).ok().map(|f| (f, s.to_owned())));
    let (filter, in_force, env_override) = match from_env {
        Some((filter, text)) => (filter, text.clone(), Some(text)),
        None => match EnvFilter::try_new(level) {
            Ok(filter) => (filter, level.to_owned(), None),
            Err(_) => (
                EnvFilter::new(FALLBACK_LEVEL),
                FALLBACK_LEVEL.to_owned(),
                None,
            ),
        },
    };
    let (layer, handle) = reload::Layer::new(filter);
    let control = LogControl {
        inner: Arc::new(Inner {
            handle,
            level: Mutex::new(in_force),
            env_override,
        }),
    };
    (layer, control)
}

/// Journald when `journal_stream` (the `JOURNAL_STREAM` variable) names `stderr` (its device
/// and inode), stderr otherwise.
#[must_use]
pub fn output_for(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> Output {
    match (journal_stream, stderr) {
        (Some(var), Some(id)) if journal_stream_matches(var, id) => Output::Journald,
        _ => Output::Stderr,
    }
}

/// Whether `JOURNAL_STREAM`'s value (`<device>:<inode>`, both decimal, as systemd.exec(5)
/// sets it) names the file `(device, inode)`. systemd's rule: a process whose stderr is
/// still the stream systemd connected (not redirected by a wrapper) should log natively.
#[must_use]
pub fn journal_stream_matches(var: &str, (device, inode): (u64, u64)) -> bool {
    let Some((dev, ino)) = var.trim().split_once(':') else {
        return false;
    };
    matches!(
        (dev.parse::<u64>(), ino.parse::<u64>()),
        (Ok(d), Ok(i)) if d == device && i == inode
    )
}

/// Stderr's (device, inode), when it can be read.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn journal_stream_must_name_stderr_exactly() {
        let id = (64769, 123_456);
        assert!(journal_stream_matches("64769:123456", id));
        assert!(journal_stream_matches("64769:123456\n", id));
        for other in [
            "64769:123457",
            "64768:123456",
            "123456:64769",
            "64769",
            "64769:",
            ":123456",
            "",
            "0x fd01:123456",
            "64769:123456:1",
            "-1:123456",
        ] {
            assert!(!journal_stream_matches(other, id), "{other:?}");
        }
        assert_eq!(output_for(Some("64769:123456"), Some(id)), Output::Journald);
        assert_eq!(output_for(Some("1:2"), Some(id)), Output::Stderr);
        assert_eq!(output_for(None, Some(id)), Output::Stderr);
        assert_eq!(output_for(Some("64769:123456"), None), Output::Stderr);
    }

    #[test]
    fn our_stderr_is_named_by_its_device_and_inode() {
        let (dev, ino) = stderr_id().unwrap();
        assert!(journal_stream_matches(&format!("{dev}:{ino}"), (dev, ino)));
    }

    /// Collects what the text layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(
        level: &str,
        rust_log: Option<&str>,
    ) -> (tracing::subscriber::DefaultGuard, LogControl, Captured) {
        let (filter, control) = filter_layer(level, rust_log);
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = Registry::default().with(filter).with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        );
        (tracing::subscriber::set_default(subscriber), control, out)
    }

    #[test]
    fn set_level_changes_what_is_logged_and_refuses_bad_filters() {
        let (_guard, control, out) = capture("info", None);
        tracing::debug!(client_id = "s1", "Hidden at info.");
        tracing::info!(client_id = "s1", "Shown at info.");
        assert_eq!(control.level(), "info");
        control.set_level("debug").unwrap();
        assert_eq!(control.level(), "debug");
        tracing::debug!(client_id = "s2", "Shown at debug.");
        let error = control.set_level("info,sensorgate=loud").unwrap_err();
        assert!(!error.is_empty());
        // A refused filter changes nothing.
        assert_eq!(control.level(), "debug");
        tracing::debug!("Still shown.");
        control.set_level("warn").unwrap();
        tracing::info!("Hidden at warn.");
        let text = out.text();
        assert!(!text.contains("Hidden"), "{text}");
        assert!(text.contains("Shown at info.") && text.contains("client_id=\"s1\""));
        assert!(text.contains("Shown at debug.") && text.contains("Still shown."));
        assert_eq!(control.env_override(), None);
    }

    #[test]
    fn rust_log_wins_at_start_and_on_reload() {
        let (_guard, control, out) = capture("warn", Some("debug"));
        assert_eq!(control.level(), "debug");
        assert_eq!(control.env_override(), Some("debug"));
        let refused = control.set_level("error").unwrap_err();
        assert!(refused.contains("RUST_LOG=\"debug\" is set"), "{refused}");
        assert!(
            !control
                .set_level("not a [filter")
                .unwrap_err()
                .contains("RUST_LOG")
        );
        tracing::debug!("Debug under RUST_LOG.");
        assert_eq!(control.level(), "debug");
        assert!(out.text().contains("Debug under RUST_LOG."));
    }

    #[test]
    fn an_invalid_start_filter_falls_back() {
        let (_guard, control, _) = capture("info,x=loud", Some("also [bad"));
        assert_eq!(control.level(), FALLBACK_LEVEL);
        assert_eq!(control.env_override(), None);
        let (_guard, control, _) = capture("debug", Some("  "));
        assert_eq!(control.level(), "debug");
    }
}
