//! A TCP proxy in front of the test S3 endpoint that injects storage faults:
//! an outage (every open connection cut mid-transfer, new ones closed at once), a
//! hang (the endpoint stops answering; bytes wait and flow again after),
//! and slow transfers (a bandwidth limit). moto keeps its objects in memory,
//! so stopping the real process would lose the bucket; from a client's side
//! connections cut and closed are what a stopped endpoint looks like.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

/// What the proxy does to traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything.
    Pass,
    /// Cut every open connection and close new ones at once.
    Down,
    /// Accept and hold, forwarding nothing until the mode changes.
    Hang,
    /// Forward at most this many bytes per second per direction and
    /// connection.
    Slow(u64),
}

const PASS: u64 = 0;
const DOWN: u64 = 1;
const HANG: u64 = 2;
/// `SLOW + n`: at most n bytes per second.
const SLOW: u64 = 16;

impl ProxyMode {
    fn encode(self) -> u64 {
        match self {
            ProxyMode::Pass => PASS,
            ProxyMode::Down => DOWN,
            ProxyMode::Hang => HANG,
            ProxyMode::Slow(rate) => SLOW + rate.max(1),
        }
    }

    fn decode(value: u64) -> Self {
        match value {
            PASS => ProxyMode::Pass,
            DOWN => ProxyMode::Down,
            HANG => ProxyMode::Hang,
            n => ProxyMode::Slow(n - SLOW),
        }
    }
}

/// A running proxy; stops accepting when dropped (open connections end
/// with their peers).
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    mode: Arc<AtomicU64>,
    /// Bumped by every switch to `Down`: connections older than it close.
    generation: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Connections cut open or closed at once by outages, since the start.
    cut: Arc<AtomicU64>,
}

/// Bytes copied per read; a slow mode sleeps after each chunk.
const CHUNK: usize = 16 * 1024;

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`
    /// (`host:port`).
    pub fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let upstream = upstream
            .to_socket_addrs()
            .expect("resolve the upstream")
            .next()
            .expect("an upstream address");
        let proxy = Self {
            port,
            mode: Arc::new(AtomicU64::new(PASS)),
            generation: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            cut: Arc::new(AtomicU64::new(0)),
        };
        let (mode, generation, stop, cut) = (
            proxy.mode.clone(),
            proxy.generation.clone(),
            proxy.stop.clone(),
            proxy.cut.clone(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if ProxyMode::decode(mode.load(Ordering::Relaxed)) == ProxyMode::Down {
                            // Closed before a byte is answered.
                            cut.fetch_add(1, Ordering::Relaxed);
                            drop(client);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let born = generation.load(Ordering::Relaxed);
                        for (from, to) in [
                            (client.try_clone(), server.try_clone()),
                            (server.try_clone(), client.try_clone()),
                        ] {
                            let (Ok(from), Ok(to)) = (from, to) else {
                                continue;
                            };
                            let (mode, generation, cut) =
                                (mode.clone(), generation.clone(), cut.clone());
                            thread::spawn(move || pump(from, to, &mode, &generation, born, &cut));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        proxy
    }

    /// `http://127.0.0.1:PORT`, the endpoint clients should use.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, mode: ProxyMode) {
        if mode == ProxyMode::Down {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        self.mode.store(mode.encode(), Ordering::Relaxed);
    }

    /// Cuts made by outages: open connections cut (once or twice each, by
    /// the direction that noticed) plus new connections closed at once.
    pub fn cut_count(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` under the proxy's mode until either side closes or
/// an outage cuts the connection.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: &AtomicU64,
    generation: &AtomicU64,
    born: u64,
    cut_count: &AtomicU64,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; CHUNK];
    let cut = |from: &TcpStream, to: &TcpStream| {
        cut_count.fetch_add(1, Ordering::Relaxed);
        for s in [from, to] {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    loop {
        if generation.load(Ordering::Relaxed) != born {
            cut(&from, &to);
            return;
        }
        match ProxyMode::decode(mode.load(Ordering::Relaxed)) {
            ProxyMode::Hang => {
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            ProxyMode::Down => {
                cut(&from, &to);
                return;
            }
            ProxyMode::Pass | ProxyMode::Slow(_) => {}
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        };
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Read);
            return;
        }
        if let ProxyMode::Slow(rate) = ProxyMode::decode(mode.load(Ordering::Relaxed)) {
            thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: each connection gets back what it sends.
    fn echo() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut read = stream.try_clone().unwrap();
                    let mut write = stream;
                    let _ = std::io::copy(&mut read, &mut write);
                });
            }
        });
        addr
    }

    fn roundtrip(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(bytes)?;
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back)?;
        Ok(back)
    }

    #[test]
    fn the_proxy_passes_cuts_hangs_and_slows() {
        let proxy = FaultProxy::start(&echo());
        let addr = proxy.endpoint().trim_start_matches("http://").to_owned();
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(roundtrip(&mut stream, b"hello").unwrap(), b"hello");

        // Slow: 64 KiB at 256 KiB/s takes about a quarter second (the
        // last chunk's pause comes after it has gone).
        proxy.set(ProxyMode::Slow(256 * 1024));
        let start = std::time::Instant::now();
        let big = vec![7u8; 64 * 1024];
        assert_eq!(roundtrip(&mut stream, &big).unwrap(), big);
        assert!(start.elapsed() >= Duration::from_millis(150));

        // Hang: nothing comes back until the mode changes.
        proxy.set(ProxyMode::Hang);
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(roundtrip(&mut stream, b"wait").is_err());
        proxy.set(ProxyMode::Pass);
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"wait");

        // Down: the open connection is cut, new ones are closed.
        proxy.set(ProxyMode::Down);
        thread::sleep(Duration::from_millis(200));
        assert!(roundtrip(&mut stream, b"gone").is_err());
        let refused = TcpStream::connect(&addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            roundtrip(&mut s, b"x")
        });
        assert!(refused.is_err());
        assert!(
            proxy.cut_count() >= 2,
            "one open connection cut, one closed"
        );

        // Back up: new connections work again.
        proxy.set(ProxyMode::Pass);
        let mut fresh = TcpStream::connect(&addr).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(roundtrip(&mut fresh, b"back").unwrap(), b"back");
    }
}
