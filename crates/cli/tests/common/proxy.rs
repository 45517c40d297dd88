//! A TCP fault proxy for tests: listens on 127.0.0.1, forwards every
//! connection to an upstream address (the hub) with two threads, and, when
//! faults are on, delays reads, stalls them, and cuts connections in the
//! middle of a stream, with a close (FIN) or a reset (RST). Every random
//! choice comes from one seeded RNG, drawn per connection in accept order,
//! so a seed fixes which connections are cut after how many bytes (thread
//! timing still varies between runs).
//!
//! A trip (`trip_on`) acts once on the first connection whose client sends
//! a marker (e.g. a file's bytes inside a commit call): it cuts that
//! connection before the marker reaches the hub, or lets the call through
//! and swallows every reply on that connection, so the hub acts on a call
//! whose answer the node never gets. `set_refusing` closes new connections
//! at once (the hub looks unreachable).
//!
//! The upstream can change (`set_upstream`): a hub restarted on a new port
//! stays reachable at the proxy's address, so nodes need no restart.
//! What it does not do: reorder or corrupt bytes (TCP would not either), or
//! fault anything but the connections that pass through it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the proxy does to the connections it forwards.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Delay before each forwarded read, uniform in this range (ms).
    pub latency_ms: (u64, u64),
    /// Chance per forwarded read that it stalls, and for how long (ms).
    pub stall_chance: f64,
    pub stall_ms: (u64, u64),
    /// Chance that a new connection is cut once this many bytes (both
    /// directions) went through, drawn log-uniformly in `cut_after`; the
    /// read that crosses the limit is forwarded only up to it.
    pub cut_chance: f64,
    pub cut_after: (u64, u64),
    /// Chance that a cut is a reset (RST) rather than a close (FIN).
    pub reset_chance: f64,
}

/// What a trip does to the connection that sent its marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// Close it before forwarding the bytes that hold the marker, and
    /// refuse new connections until `set_refusing(false)`.
    CutAndRefuse,
    /// Forward the marker, then drop every byte the hub sends back on it.
    MuteReplies,
}

/// What the proxy did so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyStats {
    pub connections: u64,
    /// Connections closed (FIN) by a fault, mid-stream or idle.
    pub cuts: u64,
    /// Connections reset (RST) by a fault.
    pub resets: u64,
    pub stalls: u64,
    pub bytes: u64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    faults: Mutex<Option<Faults>>,
    rng: Mutex<StdRng>,
    live: Mutex<Vec<Weak<Conn>>>,
    stop: AtomicBool,
    trip: Mutex<Option<(Vec<u8>, Trip)>>,
    tripped: AtomicBool,
    refusing: AtomicBool,
    connections: AtomicU64,
    cuts: AtomicU64,
    resets: AtomicU64,
    stalls: AtomicU64,
    bytes: AtomicU64,
}

struct Conn {
    client: TcpStream,
    server: TcpStream,
    /// Bytes forwarded both ways.
    forwarded: AtomicU64,
    /// Cut once `forwarded` would pass this.
    cut_after: Option<u64>,
    reset: bool,
    killed: AtomicBool,
    /// Replies are dropped (a `Trip::MuteReplies`).
    muted: AtomicBool,
    rng: Mutex<StdRng>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// SO_LINGER 0: closing the socket sends RST instead of FIN.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn uniform(rng: &mut StdRng, (low, high): (u64, u64)) -> u64 {
    if high <= low {
        low
    } else {
        rng.random_range(low..=high)
    }
}

fn log_uniform(rng: &mut StdRng, (low, high): (u64, u64)) -> u64 {
    let (low, high) = (low.max(1) as f64, high.max(low.max(1)) as f64);
    (low.ln() + rng.random::<f64>() * (high.ln() - low.ln())).exp() as u64
}

impl Conn {
    /// Ends the connection both ways: a close, or a reset (the sockets
    /// close with SO_LINGER 0 once both pumps let go of them).
    fn kill(&self, reset: bool) -> bool {
        if self.killed.swap(true, Ordering::SeqCst) {
            return false;
        }
        if reset {
            set_linger_zero(&self.client);
            set_linger_zero(&self.server);
            // Wakes both pumps without sending FIN.
            let _ = self.client.shutdown(Shutdown::Read);
            let _ = self.server.shutdown(Shutdown::Read);
        } else {
            let _ = self.client.shutdown(Shutdown::Both);
            let _ = self.server.shutdown(Shutdown::Both);
        }
        true
    }
}

impl FaultProxy {
    /// A proxy to `upstream`, faults off.
    pub fn start(upstream: SocketAddr, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            faults: Mutex::new(None),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            live: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            trip: Mutex::new(None),
            tripped: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || accept_loop(listener, accepting));
        FaultProxy { addr, shared }
    }

    /// `http://ADDR`, for a node's `--hub`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }

    /// Faults for connections from now on (`None`: forward faithfully).
    pub fn set_faults(&self, faults: Option<Faults>) {
        *lock(&self.shared.faults) = faults;
    }

    /// Cuts every live connection now (idle ones included).
    pub fn cut_all(&self, reset: bool) -> usize {
        let live: Vec<Arc<Conn>> = lock(&self.shared.live)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut cut = 0;
        for conn in live {
            if conn.kill(reset) {
                cut += 1;
                let counter = if reset {
                    &self.shared.resets
                } else {
                    &self.shared.cuts
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        cut
    }

    /// Arms a trip on `marker` (see the module doc).
    pub fn trip_on(&self, marker: &[u8], trip: Trip) {
        self.shared.tripped.store(false, Ordering::SeqCst);
        *lock(&self.shared.trip) = Some((marker.to_vec(), trip));
    }

    /// True once the armed trip acted.
    pub fn tripped(&self) -> bool {
        self.shared.tripped.load(Ordering::SeqCst)
    }

    /// While set, new connections are closed at once.
    pub fn set_refusing(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }

    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections: s.connections.load(Ordering::Relaxed),
            cuts: s.cuts.load(Ordering::Relaxed),
            resets: s.resets.load(Ordering::Relaxed),
            stalls: s.stalls.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect(self.addr);
        self.cut_all(false);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if shared.refusing.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let upstream = *lock(&shared.upstream);
        let faults = lock(&shared.faults).clone();
        let seed: u64 = lock(&shared.rng).random();
        let mut rng = StdRng::seed_from_u64(seed);
        let (cut_after, reset) = match &faults {
            Some(f) if rng.random_bool(f.cut_chance) => (
                Some(log_uniform(&mut rng, f.cut_after)),
                rng.random_bool(f.reset_chance),
            ),
            _ => (None, false),
        };
        // The hub may be down (killed): the client sees its connection close.
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let conn = Arc::new(Conn {
            client,
            server,
            forwarded: AtomicU64::new(0),
            cut_after,
            reset,
            killed: AtomicBool::new(false),
            muted: AtomicBool::new(false),
            rng: Mutex::new(rng),
        });
        {
            let mut live = lock(&shared.live);
            live.retain(|c| c.strong_count() > 0);
            live.push(Arc::downgrade(&conn));
        }
        for upward in [true, false] {
            let (conn, shared) = (conn.clone(), shared.clone());
            std::thread::spawn(move || pump(&conn, &shared, upward));
        }
    }
}

/// Forwards one direction until EOF, an error or a fault.
fn pump(conn: &Conn, shared: &Shared, upward: bool) {
    let (src, dst) = if upward {
        (&conn.client, &conn.server)
    } else {
        (&conn.server, &conn.client)
    };
    let mut buffer = vec![0u8; 16 * 1024];
    // The end of the previous read, so a marker split between reads is found.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let read = match (&*src).read(&mut buffer) {
            Ok(0) => {
                // Orderly end of this direction: pass it on.
                if !conn.killed.load(Ordering::SeqCst) {
                    let _ = dst.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(read) => read,
            Err(_) => break,
        };
        if upward && let Some(trip) = check_trip(shared, &mut tail, &buffer[..read]) {
            shared.tripped.store(true, Ordering::SeqCst);
            match trip {
                Trip::CutAndRefuse => {
                    shared.refusing.store(true, Ordering::SeqCst);
                    if conn.kill(false) {
                        shared.cuts.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Trip::MuteReplies => conn.muted.store(true, Ordering::SeqCst),
            }
        }
        if !upward && conn.muted.load(Ordering::SeqCst) {
            continue;
        }
        let faults = lock(&shared.faults).clone();
        let mut forward = read;
        let mut cut = false;
        if let Some(faults) = faults {
            let (delay, stalled) = {
                let mut rng = lock(&conn.rng);
                let mut delay = uniform(&mut rng, faults.latency_ms);
                let stalled = rng.random_bool(faults.stall_chance);
                if stalled {
                    delay += uniform(&mut rng, faults.stall_ms);
                }
                (delay, stalled)
            };
            if stalled {
                shared.stalls.fetch_add(1, Ordering::Relaxed);
            }
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            if let Some(limit) = conn.cut_after {
                let before = conn.forwarded.fetch_add(read as u64, Ordering::SeqCst);
                if before + read as u64 > limit {
                    forward = limit.saturating_sub(before) as usize;
                    cut = true;
                }
            }
        }
        if conn.killed.load(Ordering::SeqCst) {
            break;
        }
        if forward > 0 && (&*dst).write_all(&buffer[..forward]).is_err() {
            break;
        }
        shared.bytes.fetch_add(forward as u64, Ordering::Relaxed);
        if cut {
            if conn.kill(conn.reset) {
                let counter = if conn.reset {
                    &shared.resets
                } else {
                    &shared.cuts
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    }
    // An error or a kill: the whole connection goes.
    if !conn.killed.load(Ordering::SeqCst) {
        let _ = conn.client.shutdown(Shutdown::Both);
        let _ = conn.server.shutdown(Shutdown::Both);
    }
}

/// The armed trip, disarmed, if `data` (after `tail`, the end of the
/// previous read) holds its marker.
fn check_trip(shared: &Shared, tail: &mut Vec<u8>, data: &[u8]) -> Option<Trip> {
    let mut armed = lock(&shared.trip);
    let (marker, trip) = armed.as_ref()?;
    let mut window = std::mem::take(tail);
    window.extend_from_slice(data);
    let found = window.windows(marker.len()).any(|w| w == marker.as_slice());
    let trip = *trip;
    let keep = marker.len().saturating_sub(1).min(window.len());
    *tail = window[window.len() - keep..].to_vec();
    if found {
        *armed = None;
        Some(trip)
    } else {
        None
    }
}
