//! A counting TCP proxy on 127.0.0.1: every byte a client sends upstream
//! and every byte it gets back is counted, so "bytes on the wire" is
//! measured from outside for ghostmirror and rsync alike (TCP payload,
//! i.e. gRPC/HTTP2 framing or rsync protocol included; IP/TCP headers not).
//!
//! One thread accepts; each connection gets two copying threads. It does
//! not inspect, delay or reorder anything.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;

/// Bytes moved so far: client -> upstream and upstream -> client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bytes {
    pub up: u64,
    pub down: u64,
}

impl Bytes {
    pub fn total(self) -> u64 {
        self.up + self.down
    }

    pub fn since(self, earlier: Bytes) -> Bytes {
        Bytes {
            up: self.up - earlier.up,
            down: self.down - earlier.down,
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({"up": self.up, "down": self.down, "total": self.total()})
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind proxy")?;
        let addr = listener.local_addr().context("proxy address")?;
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c_up, c_down, c_stop) = (up.clone(), down.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if c_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let (a, b) = (c_up.clone(), c_down.clone());
                std::thread::spawn(move || pump(client, server, &a));
                std::thread::spawn(move || pump(server2, client2, &b));
            }
        });
        Ok(Proxy {
            addr,
            up,
            down,
            stop,
            accept: Some(accept),
        })
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn bytes(&self) -> Bytes {
        Bytes {
            up: self.up.load(Ordering::SeqCst),
            down: self.down.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Copies `from` -> `to` until EOF or error, counting bytes.
fn pump(mut from: TcpStream, mut to: TcpStream, counter: &AtomicU64) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                counter.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_both_directions() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let echo_addr = echo.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = echo.accept() {
                let mut buf = [0u8; 100];
                if stream.read_exact(&mut buf).is_ok() {
                    let _ = stream.write_all(&buf[..50]);
                }
            }
        });
        let proxy = Proxy::start(echo_addr).expect("proxy");
        let mut client = TcpStream::connect(proxy.addr).expect("connect");
        client.write_all(&[7u8; 100]).expect("send");
        let mut back = [0u8; 50];
        client.read_exact(&mut back).expect("receive");
        drop(client);
        let started = std::time::Instant::now();
        while proxy.bytes() != (Bytes { up: 100, down: 50 }) && started.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(proxy.bytes(), Bytes { up: 100, down: 50 });
    }
}
