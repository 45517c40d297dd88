//! What the machine can do at best, measured in the same run as the
//! scenarios: a local `cp -a` (with and without a final `sync`), loopback
//! TCP bandwidth over one connection, single-thread BLAKE3 throughput and a
//! bare stat walk (readdir + lstat of every entry, one thread).
//!
//! These are the yardsticks the targets are held against; nothing here
//! runs the engine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::proc::run_checked;

/// Times `cp -a src dst` and the `sync` after it. Returns (cp, sync).
pub fn cp_a(src: &Path, dst: &Path) -> anyhow::Result<(Duration, Duration)> {
    let cp = run_checked(Command::new("cp").arg("-a").arg(src).arg(dst))?;
    let sync = run_checked(&mut Command::new("sync"))?;
    Ok((cp, sync))
}

/// Bytes per second pushed through one loopback TCP connection for `time`.
pub fn loopback_bandwidth(time: Duration) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind loopback listener")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut stream = TcpStream::connect(addr).context("connect loopback")?;
    let buf = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    while started.elapsed() < time {
        stream.write_all(&buf).context("write loopback")?;
    }
    drop(stream);
    let total = reader
        .join()
        .map_err(|_| anyhow::anyhow!("loopback reader panicked"))?
        .context("read loopback")?;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Bytes per second of `blake3::hash` on one thread over `size` bytes
/// already in memory (best of three).
pub fn blake3_throughput(size: usize) -> f64 {
    let mut data = vec![0u8; size];
    crate::dataset::Rng::new(42).fill(&mut data);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let hash = blake3::hash(&data);
        std::hint::black_box(hash);
        best = best.min(started.elapsed().as_secs_f64());
    }
    size as f64 / best
}

/// A bare stat walk: readdir and lstat of every entry under `root`.
/// Returns the number of entries and the time.
pub fn stat_walk(root: &Path) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut count = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let entry = entry?;
            // DirEntry::metadata is an fstatat(.., AT_SYMLINK_NOFOLLOW).
            let meta = entry.metadata()?;
            count += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((count, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yardsticks_return_something() {
        assert!(loopback_bandwidth(Duration::from_millis(50)).expect("loopback") > 0.0);
        assert!(blake3_throughput(1 << 16) > 0.0);
        let (count, _) = stat_walk(Path::new(env!("CARGO_MANIFEST_DIR"))).expect("walk");
        assert!(count >= 2);
    }
}
