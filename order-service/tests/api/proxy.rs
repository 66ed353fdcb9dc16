//! A TCP proxy on a loopback port that a test can cut (open connections are
//! closed and the port refuses new ones, as a stopped server's would) and
//! restore, to take a backend away
//! from one service without stopping it for everyone.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::helpers::PATIENCE;

/// A proxy to one backend.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    target: SocketAddr,
    /// Bumped on every cut: open connections end when it changes.
    cuts: watch::Sender<u64>,
    accepting: Mutex<Option<JoinHandle<()>>>,
}

impl Proxy {
    /// A proxy to `target`, up; `up` false starts it cut.
    pub async fn start(target: SocketAddr, up: bool) -> Self {
        let listener = below_ephemeral_ports().await;
        let addr = listener.local_addr().expect("a bound address");
        let (cuts, _) = watch::channel(0u64);
        let proxy = Self {
            addr,
            target,
            cuts,
            accepting: Mutex::new(None),
        };
        if up {
            proxy.accept_on(listener);
        }
        proxy
    }

    fn accept_on(&self, listener: TcpListener) {
        let (target, cuts) = (self.target, self.cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, target, cuts.subscribe()));
            }
        });
        if let Some(old) = self.accepting.lock().expect("not poisoned").replace(task) {
            old.abort();
        }
    }

    /// Closes every open connection and refuses new ones (the port is
    /// closed) until [`restore`](Self::restore).
    pub fn cut(&self) {
        if let Some(task) = self.accepting.lock().expect("not poisoned").take() {
            task.abort();
        }
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Listens on the same port again.
    pub async fn restore(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "cannot listen on {} again: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.accept_on(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, mut cuts: watch::Receiver<u64>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    cuts.mark_unchanged();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cuts.changed() => {}
    }
}

/// A listener on a free loopback port below Linux's ephemeral range
/// (32768 and up). On a port from that range, a service reconnecting while
/// the proxy is cut can be given the port itself as its source port and
/// connect to itself (TCP simultaneous open), and the port cannot be
/// listened on again until it lets go.
async fn below_ephemeral_ports() -> TcpListener {
    let seed = std::process::id() as u64
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
    for attempt in 0..200u64 {
        let port = 20_000 + (seed.wrapping_mul(31).wrapping_add(attempt * 7919) % 12_000) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await {
            return listener;
        }
    }
    panic!("no free loopback port between 20000 and 32000");
}
