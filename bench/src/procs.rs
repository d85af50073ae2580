//! The processes under test: mosquitto and sensorgate, started on free loopback ports in a
//! temporary directory and killed when dropped.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::sn;

/// A free TCP port on 127.0.0.1 (also free for UDP at the moment of asking, most likely).
///
/// # Errors
/// When nothing can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    let port = tcp.local_addr()?.port();
    // Also check UDP: the gateway listens on UDP.
    UdpSocket::bind(("127.0.0.1", port))?;
    Ok(port)
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running mosquitto on 127.0.0.1.
#[derive(Debug)]
pub struct Broker {
    child: Guard,
    /// Its MQTT port.
    pub port: u16,
}

impl Broker {
    /// Starts `mosquitto` (path from `SENSORGATE_MOSQUITTO`, default `/usr/sbin/mosquitto`)
    /// with in-memory state, large queues and a 1,000-message in-flight window, and waits
    /// until it accepts connections.
    ///
    /// # Errors
    /// When it cannot be started or does not listen within 10 s.
    pub fn start(dir: &Path) -> anyhow::Result<Broker> {
        let port = free_port()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 1000000\nmax_inflight_messages 1000\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )?;
        let bin =
            std::env::var("SENSORGATE_MOSQUITTO").unwrap_or_else(|_| "/usr/sbin/mosquitto".into());
        let log = std::fs::File::create(dir.join("mosquitto.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let child = Guard(child);
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                bail!("mosquitto did not listen on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Broker { child, port })
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// A running `sensorgate run` listening on 127.0.0.1.
#[derive(Debug)]
pub struct Gateway {
    child: Guard,
    /// Where clients send.
    pub addr: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
}

/// Predefined topic id every benchmark gateway has (for QoS -1), and its topic.
pub const PREDEFINED: (u16, &str) = (1, "bench/predefined");

impl Gateway {
    /// Starts `bin` with a benchmark config (loopback listener, room for `max_clients`,
    /// upstream to `broker_port`, `extra` appended to `[mqttsn]`), waits until it answers
    /// SEARCHGW.
    ///
    /// # Errors
    /// When it cannot be started or does not answer within 10 s.
    pub fn start(
        bin: &Path,
        dir: &Path,
        broker_port: u16,
        max_clients: usize,
        extra: &str,
    ) -> anyhow::Result<Gateway> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = dir.join("sensorgate.toml");
        let state = dir.join("state");
        let mut f = std::fs::File::create(&config)?;
        write!(
            f,
            "[gateway]\nid = 1\nstate_dir = \"{}\"\n\n[log]\nlevel = \"warn\"\n\n[mqttsn]\n\
             listen = [\"{addr}\"]\nmax_clients = {max_clients}\n{extra}\n\
             [[mqttsn.predefined_topic]]\nid = {}\ntopic = \"{}\"\nclients = [\"*\"]\n\n\
             [[upstream]]\nname = \"bench\"\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{broker_port}\"\n\
             max_inflight = 10000\nqueue = 100000\n",
            state.display(),
            PREDEFINED.0,
            PREDEFINED.1,
        )?;
        drop(f);
        let log = std::fs::File::create(dir.join("sensorgate.log"))?;
        let child = Command::new(bin)
            .arg("run")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let child = Guard(child);
        let probe = UdpSocket::bind("127.0.0.1:0")?;
        probe.set_read_timeout(Some(Duration::from_millis(100)))?;
        let until = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        loop {
            if Instant::now() > until {
                bail!(
                    "sensorgate did not answer SEARCHGW within 10 s (see {})",
                    dir.display()
                );
            }
            probe.send_to(&sn::searchgw(), addr)?;
            if let Ok(n) = probe.recv(&mut buf)
                && sn::parse(buf.get(..n).unwrap_or_default()).map(|(t, _)| t)
                    == Some(sn::kind::GWINFO)
            {
                break;
            }
        }
        Ok(Gateway {
            child,
            addr,
            config,
        })
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}
