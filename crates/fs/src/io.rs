//! Limits on reading file content, shared by everything in one process that
//! reads files in bulk (hashing, serving downloads, sending uploads): at most
//! `concurrency` reads outstanding at once, and optionally at most
//! `rate` bytes per second (a token bucket). An NFS-backed hub is tuned
//! down with these so a rescan cannot starve everything else on the mount.
//! The highest concurrency actually observed is kept, for status and tests.

use std::io::Read;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct IoGate {
    concurrency: usize,
    rate: Option<u64>,
    state: Mutex<GateState>,
    freed: Condvar,
}

#[derive(Debug)]
struct GateState {
    in_use: usize,
    max_seen: usize,
    /// Token bucket: bytes available and when it was last filled.
    tokens: f64,
    filled: Instant,
}

/// One outstanding read; released on drop.
pub struct IoPermit<'a> {
    gate: &'a IoGate,
}

impl Drop for IoPermit<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_use -= 1;
        drop(state);
        self.gate.freed.notify_one();
    }
}

impl IoGate {
    /// `concurrency` is at least 1; `rate` in bytes per second, `None` for no limit.
    pub fn new(concurrency: usize, rate: Option<u64>) -> IoGate {
        IoGate {
            concurrency: concurrency.max(1),
            rate: rate.filter(|r| *r > 0),
            state: Mutex::new(GateState {
                in_use: 0,
                max_seen: 0,
                tokens: 0.0,
                filled: Instant::now(),
            }),
            freed: Condvar::new(),
        }
    }

    pub fn unlimited() -> IoGate {
        IoGate::new(usize::MAX, None)
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// The highest number of reads that were ever outstanding at once.
    pub fn max_observed(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .max_seen
    }

    /// Waits for a free slot.
    pub fn acquire(&self) -> IoPermit<'_> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while state.in_use >= self.concurrency {
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.in_use += 1;
        state.max_seen = state.max_seen.max(state.in_use);
        IoPermit { gate: self }
    }

    /// Accounts for `bytes` just read, sleeping as long as the rate requires.
    pub fn throttle(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(state.filled).as_secs_f64() * rate as f64;
            // At most one second of burst.
            state.tokens = (state.tokens + refill).min(rate as f64);
            state.filled = now;
            state.tokens -= bytes as f64;
            if state.tokens < 0.0 {
                Duration::from_secs_f64(-state.tokens / rate as f64)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Wraps a reader so every read is counted against the rate.
    pub fn reader<R: Read>(&self, inner: R) -> GatedReader<'_, R> {
        GatedReader { gate: self, inner }
    }
}

pub struct GatedReader<'a, R> {
    gate: &'a IoGate,
    inner: R,
}

impl<R: Read> Read for GatedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.gate.throttle(read);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrency_never_exceeds_the_limit() {
        let gate = Arc::new(IoGate::new(2, None));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let gate = gate.clone();
                scope.spawn(move || {
                    for _ in 0..20 {
                        let _permit = gate.acquire();
                        std::thread::sleep(Duration::from_micros(200));
                    }
                });
            }
        });
        assert_eq!(gate.max_observed(), 2);
    }

    #[test]
    fn rate_limit_slows_reads_down() {
        let gate = IoGate::new(4, Some(1 << 20));
        let data = vec![0u8; 3 << 20];
        let start = Instant::now();
        let mut reader = gate.reader(&data[..]);
        std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
        // 3 MiB at 1 MiB/s with one second of burst: at least ~2 s.
        assert!(
            start.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
    }
}
