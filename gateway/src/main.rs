//! The `sensorgate` daemon: CLI, config, logging, runtime and signals only.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sensorgate::app::{Control, RunError};
use sensorgate::config::{self, Config, LoadError};
use sensorgate::http::token;
use sensorgate::observe::cli;
use sensorgate::observe::logging::LogControl;
use sensorgate::preflight::{self, ErrorClass, PreflightError};

/// Exit status for configuration errors (EX_CONFIG, sysexits.h).
const EX_CONFIG: u8 = 78;
/// Exit status when the running user lacks a permission (EX_NOPERM).
const EX_NOPERM: u8 = 77;
/// Exit status when a directory or file cannot be created or written (EX_CANTCREAT).
const EX_CANTCREAT: u8 = 73;
/// Exit status when a resource is taken: an address in use, a state directory locked by
/// another instance (EX_UNAVAILABLE).
const EX_UNAVAILABLE: u8 = 69;
/// Exit status when the state directory holds data this version cannot read (EX_DATAERR).
const EX_DATAERR: u8 = 65;
/// Exit status for any other failure.
const EX_FAILURE: u8 = 1;
/// Exit status when `hash-token` refuses its input (EX_USAGE).
const EX_USAGE: u8 = 64;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0   success (run: stopped by SIGTERM or SIGINT)
  1   the gateway failed while running
  64  hash-token: the token was refused (too short, too long, or other characters)
  65  the spool holds a segment of a format version this sensorgate cannot read (left as is)
  69  unavailable: a listen address is in use, or the state_dir is locked by another instance
  73  cannot create: state_dir is not a directory or is on a read-only file system, or a file
      in it cannot be created
  77  permission denied: the running user may not write state_dir or bind the address
  78  configuration error (every error is listed as file:line:column)

status (the monitoring-plugin convention):
  0   healthy     1   degraded (serving, with a reason)
  2   unhealthy (not serving)     3   unreachable (not running, admin off, refused)
  78  configuration error";

#[derive(Parser)]
#[command(
    name = "sensorgate",
    version,
    about = "MQTT-SN gateway and protocol bridge",
    after_help = EXIT_STATUS_HELP
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
    /// Ask the running gateway (its admin listener, `[admin] listen`) how it is: health,
    /// upstreams and backlog, sessions, spool use, recent events. Exit status 0 healthy,
    /// 1 degraded, 2 unhealthy, 3 unreachable (the Nagios plugin convention).
    Status {
        /// Config file (for `[admin] listen` and `token`).
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Print the /status JSON document as received (exit status as above).
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file and what it needs on this host (state_dir, free space), print a
    /// summary, and exit (78 on config errors; 73, 77 as `run` would fail).
    CheckConfig {
        /// Config file.
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Print the `token_hash` line of an HTTP device's bearer token (read from stdin).
    ///
    /// The line goes into the device's [[http.device]] entry: the config holds the hash, never
    /// the token. The token is read from the first line of stdin, never from the command line
    /// (shell history, `ps`): `printf %s "$TOKEN" | sensorgate hash-token`. Exit status 64 when
    /// it is refused.
    HashToken {
        /// Make a new random token (256 bits): print it on the first line and its
        /// `token_hash` line on the second. Nothing is read.
        #[arg(long)]
        generate: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::HashToken { generate } => hash_token(generate),
        Command::Status { config, json } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    print_err(&format!("sensorgate status: cannot start a runtime: {e}\n"));
                    return ExitCode::from(cli::EXIT_UNREACHABLE);
                }
            };
            let out = rt.block_on(cli::status_command(
                cfg.admin.listen,
                cfg.admin.token.as_deref(),
                json,
                std::io::IsTerminal::is_terminal(&std::io::stdout()),
                cli::STATUS_TIMEOUT,
            ));
            print_out(&out.stdout);
            print_err(&out.stderr);
            ExitCode::from(out.code)
        }
        Command::CheckConfig { config } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            if let Err(e) = preflight::check(&cfg) {
                print_err(&format!(
                    "sensorgate: {} is valid, but `sensorgate run` would fail: {e}\n",
                    config.display()
                ));
                return exit_code(e.class());
            }
            print_out(&format!(
                "config OK: {}\n{}",
                config.display(),
                cfg.summary()
            ));
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            if let Err(e) = preflight::check(&cfg) {
                return fatal(&Fatal::from(e));
            }
            // journald or stderr (observe::logging); the control changes the level on reload.
            let log = sensorgate::observe::logging::init(&cfg.log.level);
            match run(cfg, log) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fatal(&e),
            }
        }
    }
}

/// `sensorgate hash-token [--generate]`.
fn hash_token(generate: bool) -> ExitCode {
    if generate {
        return match generate_token() {
            Ok(token) => {
                print_out(&format!("{token}\n{}\n", token_hash_line(&token)));
                ExitCode::SUCCESS
            }
            Err(_) => {
                print_err("sensorgate hash-token: the OS random number generator failed\n");
                ExitCode::from(EX_FAILURE)
            }
        };
    }
    let stdin = std::io::stdin();
    if std::io::IsTerminal::is_terminal(&stdin) {
        print_err("Token (one line; it is read here, not from the command line):\n");
    }
    // One line at most this long: a longer one is refused anyway (two bytes for "\r\n", one
    // so that a token one byte too long is seen as such).
    let limit = token::MAX_TOKEN_LEN as u64 + 3;
    let mut line = String::new();
    let refused = match stdin.lock().take(limit).read_line(&mut line) {
        Ok(_) => match token_from_line(&line) {
            Ok(token) => {
                print_out(&format!("{}\n", token_hash_line(token)));
                return ExitCode::SUCCESS;
            }
            Err(why) => why,
        },
        Err(e) => format!("cannot read the token from stdin: {e}"),
    };
    print_err(&format!("sensorgate hash-token: {refused}\n"));
    ExitCode::from(EX_USAGE)
}

/// The token on `line` (its line end removed), or why it is refused.
fn token_from_line(line: &str) -> Result<&str, String> {
    let token = line.strip_suffix('\n').unwrap_or(line);
    let token = token.strip_suffix('\r').unwrap_or(token);
    let chars = "A-Z a-z 0-9 - . _ ~ + / =";
    if token.is_empty() {
        Err(
            "no token on stdin: pipe one in (`printf %s \"$TOKEN\" | sensorgate hash-token`), \
             or make one with `sensorgate hash-token --generate`"
                .into(),
        )
    } else if !token::valid_chars(token) {
        Err(format!(
            "a token is made of {chars} (RFC 6750 b64token), at most {} of them; this one \
             is not",
            token::MAX_TOKEN_LEN
        ))
    } else if token.len() < token::MIN_TOKEN_LEN {
        Err(format!(
            "the token has {} characters; at least {} are needed (a short token can be \
             guessed): make one with `sensorgate hash-token --generate`",
            token.len(),
            token::MIN_TOKEN_LEN
        ))
    } else {
        Ok(token)
    }
}

/// The config line for `token`.
fn token_hash_line(token: &str) -> String {
    format!(
        "token_hash = \"{}\"",
        token::format_hash(&token::digest(token.as_bytes()))
    )
}

/// A new token from the OS's random number generator (see [`token_of`]).
fn generate_token() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(token_of(&bytes))
}

/// The token of 32 random bytes: `sgt_` (so that a leaked one is recognisable) and the bytes
/// in base64url without padding (b64token characters only).
fn token_of(bytes: &[u8; 32]) -> String {
    use base64::Engine as _;
    format!(
        "sgt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Writes to stdout; a reader that went away (`| head`) ends the output quietly.
fn print_out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Writes to stderr; nothing to be done when that fails.
fn print_err(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

fn config_error(e: &LoadError) -> ExitCode {
    print_err(&format!("{e}\n"));
    ExitCode::from(EX_CONFIG)
}

fn exit_code(class: ErrorClass) -> ExitCode {
    ExitCode::from(match class {
        ErrorClass::Config => EX_CONFIG,
        ErrorClass::Permission => EX_NOPERM,
        ErrorClass::CantCreate => EX_CANTCREAT,
        ErrorClass::Unavailable => EX_UNAVAILABLE,
        ErrorClass::Data => EX_DATAERR,
        ErrorClass::Other => EX_FAILURE,
    })
}

/// A failure that ends the program: its message (said once) and its class.
struct Fatal {
    class: ErrorClass,
    message: String,
}

impl From<PreflightError> for Fatal {
    fn from(e: PreflightError) -> Self {
        Fatal {
            class: e.class(),
            message: describe(&e),
        }
    }
}

impl From<RunError> for Fatal {
    fn from(e: RunError) -> Self {
        Fatal {
            class: e.class(),
            message: describe(&e),
        }
    }
}

/// The error's message followed by those of its sources, each only if not already said (many
/// errors repeat their source's text in their own message).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

/// Reports a fatal error once, on stderr (the log), and returns its exit status.
fn fatal(e: &Fatal) -> ExitCode {
    print_err(&format!("sensorgate: {}\n", e.message));
    exit_code(e.class)
}

fn run(cfg: Config, log: LogControl) -> Result<(), Fatal> {
    // One thread runs every task: the UDP driver, the upstream link and acknowledgement tasks
    // hand each message to one another several times, and on one thread each hand-over is a
    // queue push instead of a cross-thread wake-up (futex) of a parked worker. The core is
    // single-owner anyway, so more workers add wake-ups, not parallelism.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("sensorgate")
        .build()
        .map_err(|e| Fatal {
            class: ErrorClass::Other,
            message: format!("cannot start the async runtime: {e}"),
        })?;
    runtime
        .block_on(async move {
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %cfg.file.display(), "sensorgate starting.");
        for line in cfg.summary().lines() {
            tracing::info!("{line}");
        }
        let shutdown = CancellationToken::new();
        // One pending reload at most: a SIGHUP during a reload is served by one more.
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        // Installed now, before the spool is recovered: SIGHUP's default action would end
        // the process.
        let signals = install_signals();
        tokio::spawn(handle_signals(signals, shutdown.clone(), reload_tx));
        let control = Control {
            reload: Some(reload_rx),
            // `[log] level` on reload (refused, and so reported, while RUST_LOG wins).
            set_log_level: Some(std::sync::Arc::new(move |level: &str| log.set_level(level))),
        };
        sensorgate::app::run_with(cfg, shutdown, control).await?;
        tracing::info!("sensorgate stopped.");
        Ok::<(), RunError>(())
    })
        .map_err(Fatal::from)
}

/// The handlers of SIGTERM, SIGINT and SIGHUP; `None` when they cannot be installed.
fn install_signals() -> Option<[tokio::signal::unix::Signal; 3]> {
    use tokio::signal::unix::{SignalKind, signal};
    Some([
        signal(SignalKind::terminate()).ok()?,
        signal(SignalKind::interrupt()).ok()?,
        signal(SignalKind::hangup()).ok()?,
    ])
}

/// SIGTERM and SIGINT stop the gateway; SIGHUP asks it to reload its config (`systemctl
/// reload`).
async fn handle_signals(
    signals: Option<[tokio::signal::unix::Signal; 3]>,
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::Sender<()>,
) {
    let Some([mut term, mut int, mut hup]) = signals else {
        // Without signal handlers the daemon can only be killed; keep running.
        tracing::warn!("Cannot install the signal handlers: SIGTERM and SIGHUP will kill.");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("Reload requested (SIGHUP).");
                // Full: a reload is pending already and will read the file as it is now.
                let _ = reload.try_send(());
            }
        }
    }
    tracing::info!("Shutdown requested.");
    shutdown.cancel();
}

#[cfg(test)]
mod manpages;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_line_is_hashed_without_its_line_end() {
        let token = "0123456789abcdef";
        let expected = format!(
            "token_hash = \"{}\"",
            token::format_hash(&token::digest(token.as_bytes()))
        );
        for line in [
            token.to_owned(),
            format!("{token}\n"),
            format!("{token}\r\n"),
        ] {
            assert_eq!(token_from_line(&line), Ok(token));
        }
        assert_eq!(token_hash_line(token), expected);
        // A known answer: SHA-256 of the 16 characters.
        assert_eq!(
            token_hash_line("abcdefghijklmnop"),
            "token_hash = \"sha256:\
             f39dac6cbaba535e2c207cd0cd8f154974223c848f727f98b3564cea569b41cf\""
        );
    }

    #[test]
    fn short_empty_and_odd_tokens_are_refused() {
        assert!(
            token_from_line("")
                .unwrap_err()
                .contains("no token on stdin")
        );
        assert!(
            token_from_line("\n")
                .unwrap_err()
                .contains("no token on stdin")
        );
        let short = token_from_line("0123456789abcde\n").unwrap_err();
        assert!(short.contains("15 characters; at least 16"), "{short}");
        for odd in [
            "0123456789abcdef ",
            " 0123456789abcdef",
            "0123456789abcdef\n\n",
            "0123456789abcdéf",
        ] {
            let why = token_from_line(odd).unwrap_err();
            assert!(why.contains("RFC 6750"), "{odd:?}: {why}");
        }
        let long = "a".repeat(token::MAX_TOKEN_LEN + 1);
        assert!(token_from_line(&long).is_err());
        assert!(token_from_line(&"a".repeat(token::MAX_TOKEN_LEN)).is_ok());
    }

    #[test]
    fn generated_tokens_are_256_random_bits_that_hash_token_accepts() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 47, "{a}");
        assert!(a.starts_with("sgt_"));
        assert_eq!(token_from_line(&format!("{a}\n")), Ok(a.as_str()));
        assert_eq!(token_of(&[0xff; 32]), format!("sgt_{}8", "_".repeat(42)));
        assert_eq!(token_of(&[0; 32]), format!("sgt_{}", "A".repeat(43)));
    }
}
