//! Test harness: the real `ghostmirror` binary as a hub and nodes on
//! 127.0.0.1 (port 0, read back from DATA_DIR/hub.json), each in its own
//! temp dirs, with helpers to wait for a condition and to snapshot trees.
//! On a failed test the tails of every process log are printed.
//! `proxy` holds a TCP fault proxy for network-fault tests.

#![allow(dead_code)]

pub mod proxy;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-0123456789";
/// Generous: tests must not flake on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ghostmirror")
}

/// A command with a clean GM_* environment and test-friendly settings.
pub fn command() -> Command {
    command_under(&[])
}

/// `command()` run under a wrapper program (`wrapper[0] wrapper[1..] ghostmirror ...`).
pub fn command_under(wrapper: &[String]) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin());
            cmd
        }
        None => Command::new(bin()),
    };
    for (key, _) in std::env::vars() {
        if key.starts_with("GM_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("GM_LOG", "info,gm_node=debug,gm_hub=debug");
    cmd.env("GM_RACY_WINDOW_MS", "300");
    cmd.stdin(Stdio::null());
    cmd
}

pub fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_until_for(what, WAIT, condition);
}

/// `wait_until` with its own bound (for waits that follow faults, which
/// may have to outlast a node's reconnection backoff).
pub fn wait_until_for(what: &str, bound: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < bound {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {bound:?} waiting for: {what}");
}

fn print_log(name: &str, path: &Path) {
    if let Ok(text) = std::fs::read_to_string(path) {
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        eprintln!(
            "----- last lines of {name} ({}) -----\n{}",
            path.display(),
            tail.join("\n")
        );
    }
}

pub struct Hub {
    child: Option<Child>,
    /// Extra environment for every start of this hub.
    pub env: Vec<(String, String)>,
    /// A command the hub runs under (e.g. `setpriv --reuid ...`).
    pub wrapper: Vec<String>,
    pub data_dir: PathBuf,
    pub url: String,
    pub admin: String,
    log: PathBuf,
    starts: u32,
}

impl Hub {
    pub fn start(base: &Path) -> Hub {
        Hub::start_with(base, &[])
    }

    pub fn start_with(base: &Path, env: &[(&str, &str)]) -> Hub {
        Hub::start_wrapped(base, env, &[])
    }

    /// Like `start_with`, but the hub runs under `wrapper`.
    pub fn start_wrapped(base: &Path, env: &[(&str, &str)], wrapper: &[&str]) -> Hub {
        let mut hub = Hub {
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            data_dir: base.join("hub"),
            url: String::new(),
            admin: String::new(),
            log: base.join("hub.log"),
            starts: 0,
        };
        hub.spawn();
        hub
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let _ = std::fs::remove_file(self.data_dir.join("hub.json"));
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open hub log");
        let child = command_under(&self.wrapper)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args([
                "hub",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--token",
                TOKEN,
            ])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn hub");
        self.child = Some(child);
        let endpoints = self.data_dir.join("hub.json");
        wait_until("hub writes hub.json", || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                print_log("hub", &self.log);
                panic!("the hub exited at start: {status}");
            }
            endpoints.exists()
        });
        let text = std::fs::read_to_string(&endpoints).expect("read hub.json");
        let value: serde_json::Value = serde_json::from_str(&text).expect("parse hub.json");
        self.url = value["grpc"].as_str().expect("grpc").to_string();
        self.admin = value["admin"].as_str().expect("admin").to_string();
    }

    pub fn mirror(&self, workspace: &str) -> PathBuf {
        self.data_dir.join("mirrors").join(workspace)
    }

    /// Where the hub stages a mirror's files (beside `mirrors/`; inside the
    /// mirror only when the two are on different mounts).
    pub fn staging(&self, workspace: &str) -> PathBuf {
        let beside = self.data_dir.join("staging").join(workspace);
        if beside.exists() {
            beside
        } else {
            self.mirror(workspace).join(".ghostmirror/staging")
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let output = command()
            .args(["status", "--json", "--hub", &self.url, "--token", TOKEN])
            .output()
            .expect("run status");
        assert!(
            output.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status json")
    }

    pub fn workspace_status(&self, workspace: &str) -> serde_json::Value {
        let status = self.status();
        status["workspaces"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["id"] == workspace).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if start.elapsed() > WAIT {
                    let _ = child.kill();
                    panic!("hub did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sends `signal` to a process this test started (SIGSTOP, SIGCONT, ...).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory preconditions; the pid is our own child.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

impl Drop for Hub {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log("hub", &self.log);
        }
        self.kill();
    }
}

pub struct Node {
    child: Option<Child>,
    /// Extra environment for every start of this node.
    pub env: Vec<(String, String)>,
    pub name: String,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    workspace: String,
    hub_url: String,
    log: PathBuf,
}

impl Node {
    /// A node binding `workspace` to `root` (created if missing).
    pub fn new(base: &Path, hub: &Hub, name: &str, workspace: &str) -> Node {
        let root = base.join(format!("{name}-root"));
        std::fs::create_dir_all(&root).expect("create node root");
        Node {
            child: None,
            env: Vec::new(),
            name: name.to_string(),
            root,
            state_dir: base.join(format!("{name}-state")),
            workspace: workspace.to_string(),
            hub_url: hub.url.clone(),
            log: base.join(format!("{name}.log")),
        }
    }

    pub fn set_hub(&mut self, hub: &Hub) {
        self.hub_url = hub.url.clone();
    }

    /// Connects to `url` from the next start on (e.g. a fault proxy).
    pub fn set_hub_url(&mut self, url: &str) {
        self.hub_url = url.to_string();
    }

    fn base_command(&self) -> Command {
        let mut cmd = command();
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.args([
            "node",
            "--hub",
            &self.hub_url,
            "--token",
            TOKEN,
            "--node-id",
            &self.name,
        ])
        .arg("--state-dir")
        .arg(&self.state_dir)
        .arg("--workspace")
        .arg(format!("{}={}", self.workspace, self.root.display()));
        cmd
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let child = self
            .base_command()
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn node");
        self.child = Some(child);
    }

    /// `ghostmirror node --once`.
    pub fn once(&self) -> Output {
        let output = self
            .base_command()
            .arg("--once")
            .output()
            .expect("run node --once");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        use std::io::Write;
        let _ = log.write_all(&output.stderr);
        output
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if start.elapsed() > WAIT {
                    let _ = child.kill();
                    panic!("node {} did not stop on SIGTERM", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL and wait: what a crash leaves behind stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log(&self.name, &self.log);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What one path holds, for comparing replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    File { content: Vec<u8>, executable: bool },
    Dir,
    Link(String),
}

/// Every path under `root` except `.ghostmirror/`.
pub fn tree(root: &Path) -> BTreeMap<String, Item> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Item>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .to_string();
        if rel == ".ghostmirror" {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)
                .map(|t| t.to_string_lossy().to_string())
                .unwrap_or_default();
            out.insert(rel, Item::Link(target));
        } else if meta.is_dir() {
            out.insert(rel, Item::Dir);
            walk(root, &path, out);
        } else if let Ok(content) = std::fs::read(&path) {
            out.insert(
                rel,
                Item::File {
                    content,
                    executable: meta.permissions().mode() & 0o100 != 0,
                },
            );
        }
    }
}

/// Waits until every root holds the same tree, and returns it.
pub fn wait_converged(what: &str, roots: &[&Path]) -> BTreeMap<String, Item> {
    let mut last = BTreeMap::new();
    wait_until(what, || {
        let first = tree(roots[0]);
        let same = roots[1..].iter().all(|r| tree(r) == first);
        last = first;
        same
    });
    last
}

/// Waits until `condition` holds for the tree of every root.
pub fn wait_all(
    what: &str,
    roots: &[&Path],
    condition: impl Fn(&BTreeMap<String, Item>) -> bool,
) -> BTreeMap<String, Item> {
    let mut last = BTreeMap::new();
    wait_until(what, || {
        let trees: Vec<_> = roots.iter().map(|r| tree(r)).collect();
        let ok = trees.iter().all(&condition) && trees.windows(2).all(|w| w[0] == w[1]);
        last = trees.into_iter().next().unwrap_or_default();
        ok
    });
    last
}

pub fn file(content: &str) -> Item {
    Item::File {
        content: content.as_bytes().to_vec(),
        executable: false,
    }
}

pub fn write(path: &Path, content: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create parent");
    }
    std::fs::write(path, content).expect("write file");
}

/// Runs a client command (status, purge, registry, token, skill) against
/// `hub` with the admin token.
pub fn cli(hub: &Hub, args: &[&str]) -> Output {
    command()
        .env("GM_LOG", "warn")
        .args(args)
        .args(["--hub", &hub.url, "--token", TOKEN])
        .output()
        .expect("run ghostmirror")
}

/// Runs a client command that must succeed, with `--json`; returns its output.
pub fn ok(hub: &Hub, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = cli(hub, &all);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {:?}", output.stdout))
}

/// Runs a client command that must fail; returns its error message.
pub fn fails(hub: &Hub, args: &[&str]) -> String {
    let output = cli(hub, args);
    assert!(
        !output.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).trim().to_string()
}

/// Deterministic incompressible bytes (xorshift), so chunking and
/// compression behave as on real binary data.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
