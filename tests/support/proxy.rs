//! A TCP proxy that can cut the network: `down()` drops every connection and refuses new ones
//! until `up()`. Put between the relay and a real broker, it is a broker outage that loses no
//! broker state (tansu's in-memory storage would be lost if the broker itself stopped).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, cuts) = watch::channel(0u64);
        let accepting = up.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let mut cuts = cuts.clone();
                // Only cuts after this connection was accepted end it.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            up,
            cut,
            accepted,
        }
    }

    /// Connections let through so far (refused ones, while down, are not counted).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A free local port (bound, then released), below the kernel's ephemeral range (32768-60999),
/// so that an outgoing connection of a test running beside does not take it before the broker
/// binds it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    for attempt in 0u64.. {
        let port = 20_000 + (RandomState::new().hash_one(attempt) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    unreachable!()
}

/// A private tansu broker listening on `port` and advertising `advertised` (the proxy).
pub struct Tansu {
    child: std::process::Child,
}

impl Tansu {
    pub fn start(port: u16, advertised: u16) -> Self {
        let child = std::process::Command::new("tansu")
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised}"))
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu on PATH (scripts/services installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Self { child }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
