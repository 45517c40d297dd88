//! The processes a benchmark drives: the real `ghostmirror` binary as hub
//! and node, `rsync --daemon`, and one-shot commands timed with `wait4` (wall
//! time, CPU time and peak RSS of the child). Also `/proc` readings (VmHWM,
//! CPU ticks) and dropping the page cache.
//!
//! Every long-running child is owned by a `Daemon` that stops it on drop,
//! so an error in a scenario never leaves a hub or an rsync behind.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Outcome of one timed child process.
///
/// No peak RSS from `wait4` here: std spawns with `CLONE_VM`, and Linux
/// carries the parent's high-water mark into the child's `ru_maxrss`
/// across exec, so it reports gm-bench's own size. Peaks are sampled from
/// /proc instead (`TreeHwm`).
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub wall: Duration,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub user_s: f64,
    pub sys_s: f64,
    /// Largest VmHWM of the child and its descendants, when sampled.
    pub peak_kib: Option<u64>,
    /// Share of the CPUs that processes outside gm-bench's tree used
    /// meanwhile: how noisy this run's machine was.
    pub foreign_share: f64,
}

impl Timed {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "wall_s": self.wall.as_secs_f64(),
            "exit": self.code,
            "user_s": self.user_s,
            "sys_s": self.sys_s,
            "peak_kib": self.peak_kib,
            "foreign_cpu_share": self.foreign_share,
        })
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open log {}", path.display()))
}

/// Runs `cmd` to completion, stdout to `stdout`, stderr appended to
/// `stderr`, and measures it with `wait4`.
pub fn run_timed(cmd: &mut Command, stdout: &Path, stderr: &Path) -> anyhow::Result<Timed> {
    run_timed_inner(cmd, stdout, stderr, false)
}

/// As `run_timed`, also sampling the child's peak RSS every 20 ms (which
/// costs a little CPU, so only where the peak is wanted).
pub fn run_timed_peak(cmd: &mut Command, stdout: &Path, stderr: &Path) -> anyhow::Result<Timed> {
    run_timed_inner(cmd, stdout, stderr, true)
}

fn run_timed_inner(
    cmd: &mut Command,
    stdout: &Path,
    stderr: &Path,
    sample_peak: bool,
) -> anyhow::Result<Timed> {
    let out = File::create(stdout).with_context(|| format!("create {}", stdout.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(open_append(stderr)?);
    let noise = Noise::start();
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let sampler = sample_peak.then(|| TreeHwm::start(child.id(), true));
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; pid is our child, reaped here
        // and never waited on again through `child`.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
    let wall = started.elapsed();
    drop(child);
    let peak_kib = sampler.map(TreeHwm::finish);
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    Ok(Timed {
        wall,
        code,
        user_s: secs(usage.ru_utime),
        sys_s: secs(usage.ru_stime),
        peak_kib,
        foreign_share: noise.share(),
    })
}

/// Runs a helper command (cp, sync, ...) and fails unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(started.elapsed())
}

/// `sync`, then drop the page cache when `drop` is set (cold runs).
pub fn settle_caches(drop: bool) -> anyhow::Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if drop {
        std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("drop the page cache")?;
    }
    Ok(())
}

/// True when this process may drop the page cache.
pub fn can_drop_caches() -> bool {
    settle_caches(true).is_ok()
}

/// A long-running child, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    name: String,
    pub pid: u32,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Daemon> {
        let out = open_append(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().context("clone log handle")?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Daemon {
            pid: child.id(),
            child: Some(child),
            name: name.to_string(),
        })
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait().context("poll child")?
        {
            self.child = None;
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if child.try_wait().context("wait child")?.is_some() {
                return Ok(());
            }
            if started.elapsed() > grace {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within {grace:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// (VmHWM, VmRSS) in KiB from /proc/PID/status.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let after = &text[text.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// User + system CPU seconds used so far by a live process.
pub fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    stat_fields(pid).map_or(0.0, |f| {
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Fields 14 and 15 of stat; index from the state field (3).
        (get(11) + get(12)) / ticks
    })
}

/// Largest VmHWM of any descendant of `root` (and of `root` itself when
/// `include_root`), sampled every 20 ms until `finish`: how rsync's forked
/// daemon children and short-lived clients are seen.
pub struct TreeHwm {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl TreeHwm {
    pub fn start(root: u32, include_root: bool) -> TreeHwm {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                let mut pids = descendants(root);
                if include_root {
                    pids.push(root);
                }
                for pid in pids {
                    if let Ok((hwm, _)) = memory_kib(pid) {
                        peak = peak.max(hwm);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        TreeHwm {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

fn descendants(root: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let ppid = stat_fields(pid)?.get(1)?.parse::<u32>().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, ppid) in &parents {
            if found.contains(ppid) && !found.contains(pid) {
                found.push(*pid);
                grew = true;
            }
        }
    }
    found.retain(|p| *p != root);
    found
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut poll: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = poll()? {
            return Ok(value);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(interval);
    }
}

/// How to run the engine: binary, token, log filter.
#[derive(Clone)]
pub struct Engine {
    pub bin: PathBuf,
    pub token: String,
    pub log_filter: String,
}

impl Engine {
    /// A command with a clean `GM_*` environment.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (key, _) in std::env::vars() {
            if key.starts_with("GM_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("GM_LOG", &self.log_filter);
        cmd
    }

    /// `ghostmirror node` for one workspace; `--once` when `once`.
    pub fn node(&self, hub_url: &str, state: &Path, ws: &str, root: &Path, once: bool) -> Command {
        let mut cmd = self.command();
        cmd.args(["node", "--hub", hub_url, "--token", &self.token])
            .args(["--node-id", "bench"])
            .arg("--state-dir")
            .arg(state)
            .arg("--workspace")
            .arg(format!("{ws}={}", root.display()));
        if once {
            cmd.arg("--once");
        }
        cmd
    }
}

/// A running hub with its addresses.
pub struct Hub {
    pub daemon: Daemon,
    pub url: String,
    pub data_dir: PathBuf,
    engine: Engine,
}

impl Hub {
    /// Spawns a hub on ports chosen by the kernel and waits for
    /// `DATA_DIR/hub.json`, which the hub writes once its startup scan is
    /// done. Returns the hub and the time from spawn to that file.
    pub fn start(
        engine: &Engine,
        data_dir: &Path,
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<(Hub, Duration)> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("create {}", data_dir.display()))?;
        let endpoints = data_dir.join("hub.json");
        let _ = std::fs::remove_file(&endpoints);
        let mut cmd = engine.command();
        cmd.args([
            "hub",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--token", &engine.token])
        .arg("--data-dir")
        .arg(data_dir);
        let started = Instant::now();
        let mut daemon = Daemon::spawn("hub", &mut cmd, log)?;
        let ready = wait_for("hub.json", timeout, Duration::from_millis(2), || {
            if endpoints.exists() {
                return Ok(Some(started.elapsed()));
            }
            daemon.check_alive()?;
            Ok(None)
        })?;
        let text = std::fs::read_to_string(&endpoints)
            .with_context(|| format!("read {}", endpoints.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parse {}", endpoints.display()))?;
        let url = value["grpc"]
            .as_str()
            .context("hub.json has no grpc address")?
            .to_string();
        Ok((
            Hub {
                daemon,
                url,
                data_dir: data_dir.to_path_buf(),
                engine: engine.clone(),
            },
            ready,
        ))
    }

    pub fn grpc_addr(&self) -> anyhow::Result<SocketAddr> {
        let hostport = self.url.trim_start_matches("http://");
        hostport
            .parse()
            .with_context(|| format!("hub address {hostport}"))
    }

    pub fn mirror(&self, ws: &str) -> PathBuf {
        self.data_dir.join("mirrors").join(ws)
    }

    /// `ghostmirror status --json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let output = self
            .engine
            .command()
            .args(["status", "--json", "--hub", &self.url, "--token"])
            .arg(&self.engine.token)
            .stdin(Stdio::null())
            .output()
            .context("run ghostmirror status")?;
        if !output.status.success() {
            bail!(
                "status failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        serde_json::from_slice(&output.stdout).context("parse status --json")
    }

    pub fn counters(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.status()?["counters"].clone())
    }

    /// Waits until `ready(workspace status)` holds and the workspace has no
    /// racily-clean records left (nothing will be re-hashed later).
    pub fn wait_settled(
        &self,
        ws: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        wait_for(
            &format!("workspace {ws} to settle on the hub"),
            timeout,
            Duration::from_millis(250),
            || {
                let status = self.status()?;
                let found = status["workspaces"]
                    .as_array()
                    .and_then(|all| all.iter().find(|w| w["id"] == ws).cloned());
                Ok(found.filter(|w| w["racy_entries"] == 0 && ready(w)))
            },
        )
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.daemon.stop(Duration::from_secs(60))
    }
}

/// `rsync --daemon` on 127.0.0.1 with one writable module, `bench`.
pub struct Rsyncd {
    daemon: Daemon,
    pub port: u16,
}

impl Rsyncd {
    pub fn start(dir: &Path, module_path: &Path, log: &Path) -> anyhow::Result<Rsyncd> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::create_dir_all(module_path)
            .with_context(|| format!("create {}", module_path.display()))?;
        let conf = dir.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nmax connections = 8\nlog file = {}\n\n[bench]\n  path = {}\n  read only = false\n  uid = root\n  gid = root\n",
                dir.join("rsyncd.log").display(),
                module_path.display()
            ),
        )
        .with_context(|| format!("write {}", conf.display()))?;
        let port = free_port()?;
        let mut cmd = Command::new("rsync");
        cmd.arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1");
        let mut daemon = Daemon::spawn("rsync --daemon", &mut cmd, log)?;
        wait_for(
            "rsync daemon to listen",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                daemon.check_alive()?;
                Ok(TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()))
            },
        )?;
        Ok(Rsyncd { daemon, port })
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// Reads a whole small file, for logs and stats.
pub fn read_text(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    text
}

/// CPU seconds the whole machine has been busy (all cores, from /proc/stat).
pub fn machine_busy_secs() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    busy / ticks
}

/// CPU seconds used so far by gm-bench's whole process tree: itself, the
/// children it reaped, and every live descendant with what it reaped in
/// turn (rsync's daemon reaps its forked receivers).
pub fn own_cpu_secs() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let live: f64 = descendants(std::process::id())
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            // utime, stime, cutime, cstime
            (11..=14)
                .filter_map(|i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
                .sum::<f64>()
        })
        .sum();
    reaped_cpu_secs() + live / ticks
}

/// CPU seconds used by gm-bench and every child it has reaped.
fn reaped_cpu_secs() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: rusage is plain data filled by getrusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a local.
        if unsafe { libc::getrusage(who, &mut usage) } == 0 {
            let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            total += secs(usage.ru_utime) + secs(usage.ru_stime);
        }
    }
    total
}

/// Measures the CPU used by processes outside gm-bench's tree over an
/// interval: other tenants of a shared machine.
pub struct Noise {
    busy: f64,
    own: f64,
    at: Instant,
}

impl Noise {
    pub fn start() -> Noise {
        Noise {
            busy: machine_busy_secs(),
            own: own_cpu_secs(),
            at: Instant::now(),
        }
    }

    /// Foreign CPU seconds since `start`.
    pub fn foreign_secs(&self) -> f64 {
        ((machine_busy_secs() - self.busy) - (own_cpu_secs() - self.own)).max(0.0)
    }

    /// Foreign CPU as a share of all CPUs since `start`.
    pub fn share(&self) -> f64 {
        let nproc = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let elapsed = self.at.elapsed().as_secs_f64().max(1e-3);
        self.foreign_secs() / (elapsed * nproc)
    }
}

/// Share of all CPUs that processes outside gm-bench's tree used during
/// the next `window`.
pub fn foreign_cpu_share(window: Duration) -> f64 {
    let noise = Noise::start();
    std::thread::sleep(window);
    noise.share()
}

/// Waits (up to `give_up`) until other processes use at most `max_share`
/// of the CPUs over one second. Returns how long it waited and the last
/// share seen.
pub fn wait_until_quiet(max_share: f64, give_up: Duration) -> (Duration, f64) {
    let started = Instant::now();
    loop {
        let share = foreign_cpu_share(Duration::from_secs(1));
        if share <= max_share || started.elapsed() >= give_up {
            return (started.elapsed(), share);
        }
    }
}
