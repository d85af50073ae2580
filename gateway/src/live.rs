//! Reloading the config of the running gateway (SIGHUP, `systemctl reload`): part of the
//! wiring. Each request re-reads the config file; a config with any error changes nothing
//! (every error is logged with file, line and column); otherwise [`reload::plan`] says what
//! changed and each live part applies its share in place, sessions and connections untouched.
//! The outcome goes to the [`ReloadCell`] (`/status`, `sensorgate status`), the events, the
//! log and, through `on_outcome`, `STATUS=`.
//!
//! Invariants:
//! - One reload at a time, in request order; requests that arrive during one are merged into
//!   the next (the file is read again anyway).
//! - A part that fails to apply leaves the others applied; its error is in the outcome, and
//!   the next reload tries it again (the last applied config keeps its old value for it).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use sensorgate_bridges::router::RouteReconfigurer;
use sensorgate_bridges::spool::wall_ms;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LoadError};
use crate::ingress::Reconfigure;
use crate::observe::events::{Events, Level};
use crate::reload::{self, Outcome, Plan, ReloadCell};

/// What one part reports after applying its share of a plan.
#[derive(Debug, Default)]
pub struct PartResult {
    /// Remarks for the log and `/status` (a lowered limit now below current use ...).
    pub notes: Vec<String>,
    /// Why it could not apply (the part keeps its previous settings).
    pub error: Option<String>,
}

/// A future a part returns; runs on the wiring's `LocalSet`.
pub type PartFuture = Pin<Box<dyn Future<Output = PartResult>>>;

/// One live part: given the plan and the new config, the work to do (`None`: nothing changed
/// for it). The closure copies what it needs; the future owns it.
pub type Part = Box<dyn FnMut(&Plan, &Config) -> Option<(String, PartFuture)>>;

/// Called with every outcome (the systemd `STATUS=` line; the log is done here).
pub type OnOutcome = Box<dyn FnMut(&Outcome)>;

/// Sets the log filter (`[log] level`); the binary owns the subscriber.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The reload task's state.
pub struct Reloader {
    /// The file to re-read (the one the process started with).
    pub file: PathBuf,
    /// The config the process started with (restart-only keys compare with it).
    pub started: Arc<Config>,
    /// The live parts.
    pub parts: Vec<Part>,
    /// Where outcomes go.
    pub cell: Arc<ReloadCell>,
    /// Notable events.
    pub events: Arc<Events>,
    /// Called before a reload starts (systemd `RELOADING=1`) and with its outcome.
    pub on_start: Option<Box<dyn FnMut()>>,
    /// See [`OnOutcome`].
    pub on_outcome: Option<OnOutcome>,
}

/// The log part: `[log] level` through `set`.
#[must_use]
pub fn log_part(set: SetLogLevel) -> Part {
    Box::new(move |plan, _new| {
        let level = plan.log_level.clone()?;
        let set = Arc::clone(&set);
        let work: PartFuture = Box::pin(async move {
            match set(&level) {
                Ok(()) => PartResult::default(),
                Err(e) => PartResult {
                    notes: Vec::new(),
                    error: Some(format!("[log] level {level:?}: {e}")),
                },
            }
        });
        Some(("[log] level".to_owned(), work))
    })
}

/// A datagram core's part (`[mqttsn]`, `[coap]`): `pick` takes its settings from the plan; the
/// driver applies them between turns and answers with its notes.
pub fn core_part<S: Send + 'static>(
    name: &'static str,
    requests: mpsc::Sender<Reconfigure<S>>,
    pick: impl Fn(&Plan) -> Option<S> + 'static,
) -> Part {
    Box::new(move |plan, _new| {
        let settings = pick(plan)?;
        let requests = requests.clone();
        let work: PartFuture = Box::pin(async move {
            let (done, notes) = oneshot::channel();
            let sent = requests.send(Reconfigure { settings, done }).await;
            match (sent, notes.await) {
                (Ok(()), Ok(notes)) => PartResult { notes, error: None },
                _ => PartResult {
                    notes: Vec::new(),
                    error: Some(format!("{name}: the driver is gone (stopping)")),
                },
            }
        });
        Some((name.to_owned(), work))
    })
}

/// The routes' part: the router swaps its table and moves the upstream subscriptions.
#[must_use]
pub fn routes_part(router: RouteReconfigurer) -> Part {
    Box::new(move |plan, new| {
        if !plan.routes {
            return None;
        }
        let table = Arc::clone(&new.routes);
        let router = router.clone();
        let work: PartFuture = Box::pin(async move {
            let change = router.set_routes(table).await;
            let mut notes = vec![format!(
                "[[route]]: {} sensor filter(s) routed again, {} moved; {} upstream \
                 filter(s) subscribed, {} released",
                change.sensor_filters, change.moved, change.subscribed, change.unsubscribed
            )];
            if change.refused > 0 {
                notes.push(format!(
                    "[[route]]: the upstreams refused {} subscription change(s): {:?}",
                    change.refused, change.refusals
                ));
            }
            PartResult { notes, error: None }
        });
        Some(("[[route]]".to_owned(), work))
    })
}

/// The HTTP ingress's part: the new `[http]` section for requests and connections from now on,
/// or, with `[http]` unchanged, the re-read `[http.jwt]` key file when its contents changed.
#[must_use]
pub fn http_part(reloader: crate::http::Reloader) -> Part {
    Box::new(move |plan, _new| {
        // Without an `[http]` change, a SIGHUP still re-reads the JWT key file (key rotation).
        let result = match plan.http.as_ref() {
            Some(section) => reloader.apply(section),
            None => reloader.reload_keys()?,
        };
        let result = match result {
            Ok(notes) => PartResult { notes, error: None },
            Err(e) => PartResult {
                notes: Vec::new(),
                error: Some(format!("{e} (the [http] settings in force are kept)")),
            },
        };
        let work: PartFuture = Box::pin(std::future::ready(result));
        Some(("[http]".to_owned(), work))
    })
}

impl Reloader {
    /// Serves reload requests until `stop` or until the sender is gone.
    pub async fn run(mut self, mut requests: mpsc::Receiver<()>, stop: CancellationToken) {
        let mut applied = Arc::clone(&self.started);
        let mut count = 0u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                request = requests.recv() => if request.is_none() { return },
            }
            // Requests that came meanwhile are served by this one.
            while requests.try_recv().is_ok() {}
            count += 1;
            if let Some(f) = self.on_start.as_mut() {
                f();
            }
            let outcome = match Config::load(&self.file) {
                Err(e) => self.rejected(count, &e),
                Ok(new) => {
                    let new = Arc::new(new);
                    let (outcome, keep) = self.apply(count, &applied, &new).await;
                    if keep {
                        applied = new;
                    }
                    outcome
                }
            };
            self.cell.set(outcome.clone());
            if let Some(f) = self.on_outcome.as_mut() {
                f(&outcome);
            }
        }
    }

    /// The outcome of a config that did not load; each error is logged.
    fn rejected(&self, count: u64, e: &LoadError) -> Outcome {
        let errors: Vec<String> = match e {
            LoadError::Invalid(diags) => diags.iter().map(ToString::to_string).collect(),
            LoadError::Read { .. } => vec![e.to_string()],
        };
        for error in &errors {
            tracing::error!(file = %self.file.display(), "Reload: {error}");
        }
        let outcome = Outcome {
            at_ms: wall_ms(),
            count,
            ok: false,
            applied: Vec::new(),
            restart_required: Vec::new(),
            errors,
            notes: Vec::new(),
        };
        tracing::error!("{}", outcome.summary());
        self.events.push(
            outcome.at_ms,
            "config_rejected",
            Level::Warning,
            outcome.summary(),
        );
        outcome
    }

    /// Applies what `new` changes against `applied`; also says whether `new` is now the
    /// applied config (false when a part failed: the next reload tries that part again).
    async fn apply(&mut self, count: u64, applied: &Config, new: &Config) -> (Outcome, bool) {
        let plan = reload::plan(&self.started, applied, new);
        let mut outcome = Outcome {
            at_ms: 0,
            count,
            ok: true,
            applied: Vec::new(),
            restart_required: plan.restart_required.clone(),
            errors: Vec::new(),
            notes: Vec::new(),
        };
        let work: Vec<(String, PartFuture)> = self
            .parts
            .iter_mut()
            .filter_map(|p| p(&plan, new))
            .collect();
        for (name, future) in work {
            let result = future.await;
            outcome.notes.extend(result.notes);
            match result.error {
                Some(e) => outcome.errors.push(e),
                None => outcome.applied.push(name),
            }
        }
        outcome.at_ms = wall_ms();
        let summary = outcome.summary();
        if outcome.errors.is_empty() {
            tracing::info!("{summary}");
        } else {
            tracing::warn!(errors = ?outcome.errors, "{summary}");
        }
        for note in &outcome.notes {
            tracing::info!("Reload: {note}");
        }
        for key in &outcome.restart_required {
            tracing::warn!(key = %key, "Reload: changed, but only a restart applies it.");
        }
        let level = if outcome.errors.is_empty() {
            Level::Info
        } else {
            Level::Warning
        };
        self.events
            .push(outcome.at_ms, "config_reloaded", level, summary);
        let complete = outcome.errors.is_empty();
        (outcome, complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    const BASE: &str = r#"
[gateway]
state_dir = "STATE"

[mqttsn]
listen = ["127.0.0.1:0"]

[[upstream]]
name = "main"
kind = "mqtt"
url = "mqtt://127.0.0.1:1883"
"#;

    struct Rig {
        dir: tempfile::TempDir,
        path: PathBuf,
        cell: Arc<ReloadCell>,
        events: Arc<Events>,
        levels: Arc<Mutex<Vec<String>>>,
        requests: mpsc::Sender<()>,
        task: tokio::task::JoinHandle<()>,
        outcomes: mpsc::UnboundedReceiver<Outcome>,
    }

    impl Rig {
        fn write(&self, extra: &str) {
            let text = BASE.replace("STATE", &self.dir.path().display().to_string()) + extra;
            std::fs::File::create(&self.path)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }

        async fn reload(&mut self) -> Outcome {
            self.requests.send(()).await.unwrap();
            self.outcomes.recv().await.unwrap()
        }
    }

    fn rig(local: &tokio::task::LocalSet, fail_level: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sensorgate.toml");
        let text = BASE.replace("STATE", &dir.path().display().to_string());
        std::fs::write(&path, &text).unwrap();
        let started = Arc::new(Config::load(&path).unwrap());
        let levels = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&levels);
        let set: SetLogLevel = Arc::new(move |level: &str| {
            if fail_level {
                return Err("no".into());
            }
            seen.lock().unwrap().push(level.to_owned());
            Ok(())
        });
        let cell = Arc::new(ReloadCell::default());
        let events = Arc::new(Events::new(16));
        let (out_tx, outcomes) = mpsc::unbounded_channel();
        let reloader = Reloader {
            file: path.clone(),
            started,
            parts: vec![log_part(set)],
            cell: Arc::clone(&cell),
            events: Arc::clone(&events),
            on_start: None,
            on_outcome: Some(Box::new(move |o: &Outcome| {
                let _ = out_tx.send(o.clone());
            })),
        };
        let (requests, rx) = mpsc::channel(1);
        let task = local.spawn_local(reloader.run(rx, CancellationToken::new()));
        Rig {
            dir,
            path,
            cell,
            events,
            levels,
            requests,
            task,
            outcomes,
        }
    }

    #[tokio::test]
    async fn a_good_config_is_applied_and_a_bad_one_is_rejected_with_every_error() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut r = rig(&local, false);
                r.write("\n[log]\nlevel = \"debug\"\n");
                let o = r.reload().await;
                assert!(o.ok, "{o:?}");
                assert_eq!(o.applied, ["[log] level"]);
                assert_eq!(*r.levels.lock().unwrap(), ["debug"]);
                assert_eq!(r.cell.get(), Some(o));

                // Two errors: both reported, at their lines; nothing applied.
                r.write("\n[log]\nlevel = \"trace\"\nbogus = 1\n\n[spool]\nqueue = \"x\"\n");
                let o = r.reload().await;
                assert!(!o.ok);
                assert_eq!(o.errors.len(), 2, "{:?}", o.errors);
                assert!(
                    o.errors.iter().all(|e| e.contains("sensorgate.toml:")),
                    "{o:?}"
                );
                assert_eq!(*r.levels.lock().unwrap(), ["debug"]);
                assert_eq!(r.events.list().last().unwrap().kind, "config_rejected");

                // The running config is still the good one: reloading it again changes nothing.
                r.write("\n[log]\nlevel = \"debug\"\n");
                let o = r.reload().await;
                assert!(o.ok && o.applied.is_empty(), "{o:?}");
                assert_eq!(o.count, 3);
                drop(r.requests);
                r.task.await.unwrap();
            })
            .await;
    }

    #[tokio::test]
    async fn a_failing_part_is_reported_and_tried_again_next_time() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut r = rig(&local, true);
                r.write("\n[log]\nlevel = \"debug\"\n");
                let o = r.reload().await;
                assert!(o.ok, "the config itself was fine");
                assert!(o.applied.is_empty());
                assert_eq!(o.errors, ["[log] level \"debug\": no"]);
                let o = r.reload().await;
                assert_eq!(o.errors.len(), 1, "tried again: {o:?}");
                assert_eq!(r.events.list().last().unwrap().level, "warning");
            })
            .await;
    }

    #[tokio::test]
    async fn restart_only_changes_are_reported_not_applied() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut r = rig(&local, false);
                let text = std::fs::read_to_string(&r.path)
                    .unwrap()
                    .replace("127.0.0.1:0", "127.0.0.1:1");
                std::fs::write(&r.path, text).unwrap();
                let o = r.reload().await;
                assert!(o.ok);
                assert_eq!(o.restart_required, ["[mqttsn] listen"]);
                assert!(o.summary().contains("restart needed for [mqttsn] listen"));
            })
            .await;
    }
}
