//! The scenarios of issue 3, each run against ghostmirror (hub + node on
//! 127.0.0.1) and, where the work has an rsync equivalent, against
//! `rsync --daemon` on loopback in the same run, plain and with `--fsync`.
//!
//! A scenario records metrics in the `Report` (one value per run) and
//! details for the JSON; it never judges them (the report does). Every
//! scenario works in its own scratch directory under `WORK/run/`, removed
//! when it starts and when it ends. When the page cache can be dropped,
//! every timed run that is called cold starts after `sync` + drop.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::dataset::{self, Rng, Shape, Spec, Summary, remove_tree};
use crate::limits;
use crate::proc::{
    Daemon, Engine, Hub, Noise, Rsyncd, Timed, TreeHwm, cpu_secs, memory_kib, read_text,
    run_checked, run_timed, run_timed_peak, settle_caches, wait_for, wait_until_quiet,
};
use crate::proxy::Proxy;
use crate::report::{Report, Unit};

/// The workspace id used everywhere.
const WS: &str = "bench";
/// Longer than the engine's default racily-clean window (2 s): files
/// prepared before a node starts look as old as in a real workspace.
const RACY_PAUSE: Duration = Duration::from_millis(2500);
const HUB_TIMEOUT: Duration = Duration::from_secs(1800);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1800);

/// Dataset sizes and counts: the issue's, or small ones for `--quick`.
pub struct Sizes {
    pub src: Spec,
    pub large: Spec,
    pub mixed: Spec,
    pub many: Spec,
    pub track: Spec,
    pub edits: usize,
    pub rename_files: u64,
}

impl Sizes {
    pub fn new(quick: bool, seed: u64) -> Sizes {
        let scale = |full: u64, small: u64| if quick { small } else { full };
        Sizes {
            src: Spec {
                name: "src",
                seed,
                shape: Shape::Tree {
                    files: scale(30_000, 3_000),
                    per_dir: 30,
                    min: 200,
                    max: 64 << 10,
                    skew: 0.8,
                },
            },
            large: Spec {
                name: "large",
                seed,
                shape: Shape::Large {
                    count: 4,
                    size: scale(512 << 20, 32 << 20),
                },
            },
            mixed: Spec {
                name: "mixed",
                seed,
                shape: Shape::Mixed {
                    small: scale(5_000, 500),
                    medium: scale(200, 20),
                    medium_max: 16 << 20,
                    blobs: 2,
                    blob_size: scale(128 << 20, 16 << 20),
                    links: scale(50, 10),
                },
            },
            many: Spec {
                name: "many",
                seed,
                shape: Shape::Tree {
                    files: scale(100_000, 10_000),
                    per_dir: 50,
                    min: 64,
                    max: 8 << 10,
                    skew: 1.0,
                },
            },
            track: Spec {
                name: "track",
                seed,
                shape: Shape::Tree {
                    files: scale(200_000, 20_000),
                    per_dir: 100,
                    min: 16,
                    max: 512,
                    skew: 1.0,
                },
            },
            edits: if quick { 100 } else { 1_000 },
            rename_files: 500,
        }
    }
}

pub struct Ctx {
    pub engine: Engine,
    pub data: PathBuf,
    pub run: PathBuf,
    pub logs: PathBuf,
    pub runs: usize,
    pub cold: bool,
    pub fsync: bool,
    pub seed: u64,
    pub sizes: Sizes,
    pub report: Report,
    /// Before each timed run, wait until other processes use at most this
    /// share of the CPUs (0: do not wait).
    pub quiet_below: f64,
    pub quiet_timeout: Duration,
}

impl Ctx {
    /// Before a cold run: wait for a quiet machine, `sync`, drop caches.
    fn settle(&mut self) -> anyhow::Result<()> {
        self.quiet();
        settle_caches(self.cold)
    }

    /// Before a warm run: wait for a quiet machine only.
    fn quiet(&mut self) {
        if self.quiet_below <= 0.0 {
            return;
        }
        let (waited, share) = wait_until_quiet(self.quiet_below, self.quiet_timeout);
        if waited > Duration::from_secs(2) {
            crate::note(format_args!(
                "waited {:.0} s for other processes to calm down (now {:.0} % of the CPUs)",
                waited.as_secs_f64(),
                share * 100.0
            ));
        }
        self.report.push_detail(
            "quiet_checks",
            json!({"waited_s": waited.as_secs_f64(), "foreign_share": share}),
        );
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    /// A fresh scratch directory `WORK/run/NAME`.
    fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.run.join(name);
        remove_tree(&path)?;
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(path)
    }

    fn node_once(
        &self,
        hub_url: &str,
        state: &Path,
        root: &Path,
        tag: &str,
    ) -> anyhow::Result<Timed> {
        let log = self.log(&format!("{tag}.log"));
        let timed = run_timed(
            &mut self.engine.node(hub_url, state, WS, root, true),
            &self.log(&format!("{tag}.out")),
            &log,
        )?;
        if !timed.ok() {
            bail!(
                "node --once ({tag}) exited with {:?}; log {}",
                timed.code,
                log.display()
            );
        }
        Ok(timed)
    }

    fn start_hub(&self, data_dir: &Path, tag: &str) -> anyhow::Result<(Hub, Duration)> {
        Hub::start(
            &self.engine,
            data_dir,
            &self.log(&format!("{tag}-hub.log")),
            HUB_TIMEOUT,
        )
    }

    fn start_node(
        &self,
        hub_url: &str,
        state: &Path,
        root: &Path,
        tag: &str,
    ) -> anyhow::Result<Daemon> {
        Daemon::spawn(
            "node",
            &mut self.engine.node(hub_url, state, WS, root, false),
            &self.log(&format!("{tag}-node.log")),
        )
    }
}

/// What `rsync --stats` said about one push.
pub struct RsyncRun {
    pub timed: Timed,
    pub sent: u64,
    pub received: u64,
    pub literal: u64,
    pub matched: u64,
}

impl RsyncRun {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "process": self.timed.to_json(),
            "stats_bytes_sent": self.sent,
            "stats_bytes_received": self.received,
            "literal_data": self.literal,
            "matched_data": self.matched,
        })
    }
}

fn stat_number(text: &str, label: &str) -> u64 {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .map(|n| n.replace(',', ""))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `rsync -a --stats SRC/ rsync://127.0.0.1:PORT/bench/` plus `extra`.
fn rsync(ctx: &Ctx, src: &Path, port: u16, extra: &[&str], tag: &str) -> anyhow::Result<RsyncRun> {
    rsync_with(ctx, src, port, extra, tag, false)
}

fn rsync_with(
    ctx: &Ctx,
    src: &Path,
    port: u16,
    extra: &[&str],
    tag: &str,
    sample_peak: bool,
) -> anyhow::Result<RsyncRun> {
    let mut cmd = Command::new("rsync");
    cmd.args(["-a", "--stats", "--exclude=/.ghostmirror/"])
        .args(extra)
        .arg(format!("{}/", src.display()))
        .arg(format!("rsync://127.0.0.1:{port}/bench/"));
    let out = ctx.log(&format!("{tag}.out"));
    let err = ctx.log(&format!("{tag}.log"));
    let timed = if sample_peak {
        run_timed_peak(&mut cmd, &out, &err)?
    } else {
        run_timed(&mut cmd, &out, &err)?
    };
    if !timed.ok() {
        bail!(
            "rsync ({tag}) exited with {:?}: {}",
            timed.code,
            read_text(&err).trim()
        );
    }
    let text = read_text(&out);
    Ok(RsyncRun {
        timed,
        sent: stat_number(&text, "Total bytes sent"),
        received: stat_number(&text, "Total bytes received"),
        literal: stat_number(&text, "Literal data"),
        matched: stat_number(&text, "Matched data"),
    })
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    run_checked(Command::new("cp").arg("-a").arg(from).arg(to))?;
    Ok(())
}

fn fresh_dir(path: &Path) -> anyhow::Result<()> {
    remove_tree(path)?;
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Waits until the proxy has moved no byte for `quiet`.
fn wait_quiet(proxy: &Proxy, quiet: Duration, timeout: Duration) -> anyhow::Result<()> {
    let mut last = proxy.bytes();
    let mut since = Instant::now();
    wait_for(
        "the wire to go quiet",
        timeout,
        Duration::from_millis(50),
        || {
            let now = proxy.bytes();
            if now != last {
                last = now;
                since = Instant::now();
            }
            Ok((since.elapsed() >= quiet).then_some(()))
        },
    )
}

/// The yardsticks: loopback, BLAKE3, `cp -a` of each sync dataset, and a
/// stat walk of `src`.
pub fn limits(ctx: &mut Ctx, quick: bool) -> anyhow::Result<()> {
    let seconds = if quick { 1 } else { 3 };
    for _ in 0..ctx.runs {
        ctx.quiet();
        let bw = limits::loopback_bandwidth(Duration::from_secs(seconds))?;
        ctx.report
            .add("limit.loopback.throughput", Unit::BytesPerSec, bw);
    }
    let size = if quick { 64 << 20 } else { 256 << 20 };
    ctx.quiet();
    ctx.report.add(
        "limit.blake3.throughput",
        Unit::BytesPerSec,
        limits::blake3_throughput(size),
    );
    for spec in [
        ctx.sizes.src.clone(),
        ctx.sizes.large.clone(),
        ctx.sizes.mixed.clone(),
    ] {
        let (data, summary) = dataset::ensure(&ctx.data, &spec)?;
        ctx.report
            .detail(&format!("dataset.{}", spec.name), summary.to_json());
        for _ in 0..ctx.runs {
            let dst = ctx.scratch("cp")?;
            ctx.settle()?;
            let (cp, sync) = limits::cp_a(&data, &dst.join(spec.name))?;
            ctx.report.add(
                &format!("limit.cp.{}.cp_s", spec.name),
                Unit::Secs,
                secs(cp),
            );
            ctx.report.add(
                &format!("limit.cp.{}.total_s", spec.name),
                Unit::Secs,
                secs(cp + sync),
            );
            remove_tree(&dst)?;
        }
        if spec.name == "src" {
            for _ in 0..ctx.runs {
                ctx.settle()?;
                let (_, cold) = limits::stat_walk(&data)?;
                let (_, warm) = limits::stat_walk(&data)?;
                ctx.report
                    .add("limit.statwalk.src.cold_s", Unit::Secs, secs(cold));
                ctx.report
                    .add("limit.statwalk.src.warm_s", Unit::Secs, secs(warm));
            }
        }
    }
    Ok(())
}

/// The large-file path limit: the slower of loopback TCP and a durable
/// local copy (`cp -a` + `sync`) of `large`.
pub fn derive_limits(report: &mut Report, large_bytes: Option<u64>) {
    let (Some(loopback), Some(cp), Some(bytes)) = (
        report.median("limit.loopback.throughput"),
        report.median("limit.cp.large.total_s"),
        large_bytes,
    ) else {
        return;
    };
    let disk = bytes as f64 / cp;
    report.add(
        "limit.large_path.throughput",
        Unit::BytesPerSec,
        loopback.min(disk),
    );
    report.detail(
        "limit.large_path",
        json!({"loopback_bytes_per_s": loopback, "cp_a_sync_bytes_per_s": disk}),
    );
}

/// Initial sync of a dataset: `node --once` into an empty hub vs a push
/// into an empty rsync module. For `src` also the restart with no change:
/// a second `--once` vs rsync's quick check, cold and warm.
pub fn initial_sync(ctx: &mut Ctx, which: &str) -> anyhow::Result<()> {
    let spec = match which {
        "src" => ctx.sizes.src.clone(),
        "large" => ctx.sizes.large.clone(),
        _ => ctx.sizes.mixed.clone(),
    };
    let with_restart = which == "src";
    let (data, summary) = dataset::ensure(&ctx.data, &spec)?;
    ctx.report
        .detail(&format!("dataset.{which}"), summary.to_json());
    let base = ctx.scratch(&format!("initial-{which}"))?;
    let ws = base.join("ws");
    copy_tree(&data, &ws)?;
    std::thread::sleep(RACY_PAUSE);
    let dst = base.join("rsync-dst");
    let rsyncd = Rsyncd::start(
        &base.join("rsyncd"),
        &dst,
        &ctx.log(&format!("{which}-rsyncd.log")),
    )?;
    let expected = summary.files + summary.symlinks;
    for r in 0..ctx.runs {
        let tag = format!("{which}-r{r}");
        crate::note(format_args!("{tag}"));
        // ghostmirror
        let hub_dir = base.join("hub");
        let state = base.join("node-state");
        remove_tree(&hub_dir)?;
        remove_tree(&state)?;
        let (mut hub, _) = ctx.start_hub(&hub_dir, &tag)?;
        ctx.settle()?;
        let cpu0 = cpu_secs(hub.daemon.pid);
        let timed = ctx.node_once(&hub.url, &state, &ws, &format!("{tag}-node"))?;
        let hub_cpu = cpu_secs(hub.daemon.pid) - cpu0;
        let counters = hub.counters()?;
        let landed = dataset::count_entries(&hub.mirror(WS))?;
        if landed != expected {
            bail!("{tag}: the mirror holds {landed} files, expected {expected}");
        }
        ctx.report
            .add(&format!("{which}.gm.wall_s"), Unit::Secs, secs(timed.wall));
        ctx.report.add(
            &format!("{which}.gm.throughput"),
            Unit::BytesPerSec,
            summary.bytes as f64 / secs(timed.wall),
        );
        let mut record = json!({
            "run": r, "node": timed.to_json(), "hub_cpu_s": hub_cpu, "hub_counters": counters,
        });
        if with_restart {
            let started = Instant::now();
            hub.wait_settled(WS, SETTLE_TIMEOUT, |_| true)?;
            record["hub_racy_settle_s"] = json!(secs(started.elapsed()));
            for cache in ["cold", "warm"] {
                if cache == "cold" {
                    ctx.settle()?;
                } else {
                    ctx.quiet();
                }
                let cpu0 = cpu_secs(hub.daemon.pid);
                let t = ctx.node_once(&hub.url, &state, &ws, &format!("{tag}-restart-{cache}"))?;
                ctx.report.add(
                    &format!("src.restart.gm.{cache}_s"),
                    Unit::Secs,
                    secs(t.wall),
                );
                record[format!("restart_{cache}")] =
                    json!({"node": t.to_json(), "hub_cpu_s": cpu_secs(hub.daemon.pid) - cpu0});
            }
        }
        hub.stop()?;
        drop(hub);
        remove_tree(&hub_dir)?;
        ctx.report.push_detail(&format!("{which}.gm.runs"), record);

        // rsync, plain
        fresh_dir(&dst)?;
        ctx.settle()?;
        let plain = rsync(ctx, &ws, rsyncd.port, &[], &format!("{tag}-rsync"))?;
        ctx.report.add(
            &format!("{which}.rsync.wall_s"),
            Unit::Secs,
            secs(plain.timed.wall),
        );
        let mut record = json!({"run": r, "plain": plain.to_json()});
        if with_restart {
            for cache in ["cold", "warm"] {
                if cache == "cold" {
                    ctx.settle()?;
                } else {
                    ctx.quiet();
                }
                let again = rsync(
                    ctx,
                    &ws,
                    rsyncd.port,
                    &[],
                    &format!("{tag}-rsync-again-{cache}"),
                )?;
                ctx.report.add(
                    &format!("src.restart.rsync.{cache}_s"),
                    Unit::Secs,
                    secs(again.timed.wall),
                );
                record[format!("quick_check_{cache}")] = again.to_json();
            }
        }
        // rsync --fsync
        if ctx.fsync {
            fresh_dir(&dst)?;
            ctx.settle()?;
            let synced = rsync(
                ctx,
                &ws,
                rsyncd.port,
                &["--fsync"],
                &format!("{tag}-rsync-fsync"),
            )?;
            ctx.report.add(
                &format!("{which}.rsync_fsync.wall_s"),
                Unit::Secs,
                secs(synced.timed.wall),
            );
            record["fsync"] = synced.to_json();
        }
        ctx.report
            .push_detail(&format!("{which}.rsync.runs"), record);
    }
    drop(rsyncd);
    remove_tree(&base)?;
    Ok(())
}

/// Hub restart over a mirror of `many` files: spawn to `hub.json` (written
/// after the startup scan) vs a bare stat walk of the same mirror, with
/// the hub's `files_hashed` counter, which must stay 0.
pub fn hub_restart(ctx: &mut Ctx) -> anyhow::Result<()> {
    let spec = ctx.sizes.many.clone();
    let (data, summary) = dataset::ensure(&ctx.data, &spec)?;
    ctx.report.detail("dataset.many", summary.to_json());
    let base = ctx.scratch("hubrestart")?;
    let hub_dir = base.join("hub");
    let mirrors = hub_dir.join("mirrors");
    std::fs::create_dir_all(&mirrors)?;
    let mirror = mirrors.join(WS);
    copy_tree(&data, &mirror)?;
    // The first start adopts the mirror and hashes every file once.
    let (mut hub, first) = ctx.start_hub(&hub_dir, "hubrestart-adopt")?;
    let started = Instant::now();
    hub.wait_settled(WS, SETTLE_TIMEOUT, |w| {
        w["files"].as_u64() == Some(summary.files)
    })?;
    let counters = hub.counters()?;
    hub.stop()?;
    drop(hub);
    ctx.report.detail(
        "hubrestart.adopt",
        json!({"spawn_to_ready_s": secs(first), "racy_settle_s": secs(started.elapsed()), "counters": counters}),
    );
    ctx.report
        .add("hubrestart.files", Unit::Count, summary.files as f64);
    for r in 0..ctx.runs {
        for cache in ["cold", "warm"] {
            let tag = format!("hubrestart-r{r}-{cache}");
            crate::note(format_args!("{tag}"));
            if cache == "cold" {
                ctx.settle()?;
            } else {
                ctx.quiet();
            }
            let noise = Noise::start();
            let (mut hub, ready) = ctx.start_hub(&hub_dir, &tag)?;
            let noise = noise.share();
            let counters = hub.counters()?;
            let (hwm, _) = memory_kib(hub.daemon.pid)?;
            hub.stop()?;
            drop(hub);
            let hashed = counters["files_hashed"].as_f64().unwrap_or(f64::NAN);
            ctx.report
                .add(&format!("hubrestart.gm.{cache}_s"), Unit::Secs, secs(ready));
            ctx.report.add(
                &format!("hubrestart.gm.{cache}_hashed"),
                Unit::Count,
                hashed,
            );
            if cache == "cold" {
                ctx.settle()?;
            } else {
                ctx.quiet();
            }
            let (entries, walk) = limits::stat_walk(&mirror)?;
            ctx.report.add(
                &format!("hubrestart.statwalk.{cache}_s"),
                Unit::Secs,
                secs(walk),
            );
            ctx.report.push_detail(
                "hubrestart.runs",
                json!({"run": r, "cache": cache, "spawn_to_ready_s": secs(ready), "counters": counters,
                       "foreign_cpu_share": noise,
                       "hub_hwm_kib": hwm, "stat_walk_s": secs(walk), "stat_walk_entries": entries}),
            );
        }
    }
    remove_tree(&base)?;
    Ok(())
}

/// Writes 1 MiB of new bytes in the middle of `path` (no truncation).
fn overwrite_middle(path: &Path, size: u64, seed: u64, run: usize) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut patch = vec![0u8; 1 << 20];
    Rng::for_item(seed, "overwrite", run as u64).fill(&mut patch);
    file.seek(SeekFrom::Start(size / 2 - (512 << 10)))?;
    file.write_all(&patch)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// 1 MiB overwritten in the middle of a large file: bytes on the wire
/// (counting proxy, both directions) and wall time of `node --once` vs an
/// rsync delta push (`--no-whole-file`) through the same kind of proxy.
pub fn overwrite(ctx: &mut Ctx) -> anyhow::Result<()> {
    let spec = ctx.sizes.large.clone();
    let (data, _) = dataset::ensure(&ctx.data, &spec)?;
    let base = ctx.scratch("overwrite")?;
    let ws = base.join("ws");
    std::fs::create_dir_all(&ws)?;
    let file = ws.join("big.bin");
    run_checked(
        Command::new("cp")
            .arg("-a")
            .arg(data.join("f0.bin"))
            .arg(&file),
    )?;
    let size = std::fs::metadata(&file)?.len();
    ctx.report
        .add("overwrite.file_bytes", Unit::Bytes, size as f64);
    std::thread::sleep(RACY_PAUSE);

    let state = base.join("node-state");
    let (mut hub, _) = ctx.start_hub(&base.join("hub"), "overwrite")?;
    let first = ctx.node_once(&hub.url, &state, &ws, "overwrite-initial")?;
    hub.wait_settled(WS, SETTLE_TIMEOUT, |_| true)?;
    ctx.report.detail("overwrite.gm.initial", first.to_json());
    let proxy = Proxy::start(hub.grpc_addr()?)?;

    let rsyncd = Rsyncd::start(
        &base.join("rsyncd"),
        &base.join("rsync-dst"),
        &ctx.log("overwrite-rsyncd.log"),
    )?;
    let rproxy = Proxy::start(rsyncd.addr())?;
    rsync(ctx, &ws, rsyncd.port, &[], "overwrite-rsync-initial")?;
    let fsync_daemon = if ctx.fsync {
        let daemon = Rsyncd::start(
            &base.join("rsyncd-fsync"),
            &base.join("rsync-fsync-dst"),
            &ctx.log("overwrite-rsyncd-fsync.log"),
        )?;
        rsync(
            ctx,
            &ws,
            daemon.port,
            &["--fsync"],
            "overwrite-rsync-fsync-initial",
        )?;
        Some(daemon)
    } else {
        None
    };

    for r in 0..ctx.runs {
        let tag = format!("overwrite-r{r}");
        crate::note(format_args!("{tag}"));
        overwrite_middle(&file, size, ctx.seed, r)?;
        ctx.settle()?;
        let before = proxy.bytes();
        let counters0 = hub.counters()?;
        let timed = ctx.node_once(&proxy.url("http"), &state, &ws, &format!("{tag}-node"))?;
        wait_quiet(&proxy, Duration::from_millis(200), Duration::from_secs(30))?;
        let wire = proxy.bytes().since(before);
        let counters1 = hub.counters()?;
        ctx.report
            .add("overwrite.gm.wall_s", Unit::Secs, secs(timed.wall));
        ctx.report
            .add("overwrite.gm.wire_bytes", Unit::Bytes, wire.total() as f64);
        hub.wait_settled(WS, SETTLE_TIMEOUT, |_| true)?;

        ctx.settle()?;
        let before = rproxy.bytes();
        let run = rsync(
            ctx,
            &ws,
            rproxy.addr.port(),
            &["--no-whole-file"],
            &format!("{tag}-rsync"),
        )?;
        let rwire = rproxy.bytes().since(before);
        ctx.report
            .add("overwrite.rsync.wall_s", Unit::Secs, secs(run.timed.wall));
        ctx.report.add(
            "overwrite.rsync.wire_bytes",
            Unit::Bytes,
            rwire.total() as f64,
        );
        let mut record = json!({
            "run": r, "node": timed.to_json(), "wire": wire.to_json(),
            "hub_bytes_received": counters1["bytes_received"].as_u64().unwrap_or(0)
                .saturating_sub(counters0["bytes_received"].as_u64().unwrap_or(0)),
            "rsync": run.to_json(), "rsync_wire": rwire.to_json(),
        });
        if let Some(daemon) = &fsync_daemon {
            ctx.settle()?;
            let run = rsync(
                ctx,
                &ws,
                daemon.port,
                &["--no-whole-file", "--fsync"],
                &format!("{tag}-rsync-fsync"),
            )?;
            ctx.report.add(
                "overwrite.rsync_fsync.wall_s",
                Unit::Secs,
                secs(run.timed.wall),
            );
            record["rsync_fsync"] = run.to_json();
        }
        ctx.report.push_detail("overwrite.runs", record);
    }
    drop(proxy);
    drop(rproxy);
    hub.stop()?;
    drop(hub);
    drop(rsyncd);
    drop(fsync_daemon);
    remove_tree(&base)?;
    Ok(())
}

fn count_dir(path: &Path) -> usize {
    std::fs::read_dir(path).map_or(0, |d| d.flatten().count())
}

/// Renames a directory of 500 files under a live node (through the
/// counting proxy) and counts the bytes until the mirror shows it and the
/// wire is quiet again; rsync `-a --delete` of the same rename for scale.
pub fn rename(ctx: &mut Ctx) -> anyhow::Result<()> {
    let base = ctx.scratch("rename")?;
    let ws = base.join("ws");
    let first = ws.join("proj").join("dir-0");
    std::fs::create_dir_all(&first)?;
    let count = ctx.sizes.rename_files;
    let mut bytes = 0u64;
    for index in 0..count {
        let mut rng = Rng::for_item(ctx.seed, "rename", index);
        let size = rng.size(1 << 10, 16 << 10, 1.0) as usize;
        let path = first.join(format!("file{index:04}.txt"));
        std::fs::write(&path, rng.text(size))
            .with_context(|| format!("write {}", path.display()))?;
        bytes += size as u64;
    }
    let mut other = Summary::default();
    dataset::write_tree(
        &ws.join("other"),
        ctx.seed,
        "rename-other",
        200,
        50,
        (200, 8 << 10, 1.0),
        &mut other,
    )?;
    let total_files = count + other.files;
    ctx.report.detail(
        "rename.dataset",
        json!({"renamed_files": count, "renamed_bytes": bytes, "other_files": other.files}),
    );
    std::thread::sleep(RACY_PAUSE);

    let (mut hub, _) = ctx.start_hub(&base.join("hub"), "rename")?;
    let proxy = Proxy::start(hub.grpc_addr()?)?;
    let mut node = ctx.start_node(&proxy.url("http"), &base.join("node-state"), &ws, "rename")?;
    hub.wait_settled(WS, SETTLE_TIMEOUT, |w| {
        w["files"].as_u64() == Some(total_files)
    })?;
    wait_quiet(&proxy, Duration::from_secs(1), Duration::from_secs(120))?;
    let idle_from = proxy.bytes();
    std::thread::sleep(Duration::from_secs(2));
    let idle = proxy.bytes().since(idle_from);
    ctx.report.detail("rename.gm.idle_bytes_2s", idle.to_json());

    let rsyncd = Rsyncd::start(
        &base.join("rsyncd"),
        &base.join("rsync-dst"),
        &ctx.log("rename-rsyncd.log"),
    )?;
    let rproxy = Proxy::start(rsyncd.addr())?;
    rsync(ctx, &ws, rsyncd.port, &["--delete"], "rename-rsync-initial")?;

    let mirror = hub.mirror(WS).join("proj");
    let mut current = "dir-0".to_string();
    for r in 0..ctx.runs {
        let tag = format!("rename-r{r}");
        crate::note(format_args!("{tag}"));
        let next = format!("dir-{}", r + 1);
        ctx.quiet();
        let before = proxy.bytes();
        let counters0 = hub.counters()?;
        let started = Instant::now();
        std::fs::rename(ws.join("proj").join(&current), ws.join("proj").join(&next))
            .context("rename the directory")?;
        wait_for(
            "the rename to reach the mirror",
            Duration::from_secs(120),
            Duration::from_millis(2),
            || {
                node.check_alive()?;
                Ok((count_dir(&mirror.join(&next)) == count as usize
                    && !mirror.join(&current).exists())
                .then_some(()))
            },
        )?;
        let visible = started.elapsed();
        wait_quiet(&proxy, Duration::from_secs(1), Duration::from_secs(120))?;
        let wire = proxy.bytes().since(before);
        let counters1 = hub.counters()?;
        ctx.report
            .add("rename.gm.wire_bytes", Unit::Bytes, wire.total() as f64);
        ctx.report
            .add("rename.gm.visible_s", Unit::Secs, secs(visible));
        hub.wait_settled(WS, SETTLE_TIMEOUT, |w| {
            w["files"].as_u64() == Some(total_files)
        })?;

        ctx.quiet();
        let rbefore = rproxy.bytes();
        let run = rsync(
            ctx,
            &ws,
            rproxy.addr.port(),
            &["--delete"],
            &format!("{tag}-rsync"),
        )?;
        let rwire = rproxy.bytes().since(rbefore);
        ctx.report
            .add("rename.rsync.wire_bytes", Unit::Bytes, rwire.total() as f64);
        ctx.report
            .add("rename.rsync.wall_s", Unit::Secs, secs(run.timed.wall));
        ctx.report.push_detail(
            "rename.runs",
            json!({"run": r, "wire": wire.to_json(), "visible_s": secs(visible),
                   "hub_counters_before": counters0, "hub_counters_after": counters1,
                   "rsync": run.to_json(), "rsync_wire": rwire.to_json()}),
        );
        current = next;
    }
    node.stop(Duration::from_secs(60))?;
    hub.stop()?;
    drop(hub);
    remove_tree(&base)?;
    Ok(())
}

/// Live edits on a node, each timed from just before the write until the
/// mirror file holds the new bytes (polled every 0.5 ms).
pub fn live(ctx: &mut Ctx) -> anyhow::Result<()> {
    const FILES: usize = 20;
    let base = ctx.scratch("live")?;
    let ws = base.join("ws");
    std::fs::create_dir_all(ws.join("edit"))?;
    for index in 0..FILES {
        let mut rng = Rng::for_item(ctx.seed, "live-initial", index as u64);
        std::fs::write(ws.join(format!("edit/f{index:02}.txt")), rng.text(2048))?;
    }
    let (mut hub, _) = ctx.start_hub(&base.join("hub"), "live")?;
    let mut node = ctx.start_node(&hub.url, &base.join("node-state"), &ws, "live")?;
    hub.wait_settled(WS, SETTLE_TIMEOUT, |w| {
        w["files"].as_u64() == Some(FILES as u64)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let mirror = hub.mirror(WS);
    let mut latencies = Vec::with_capacity(ctx.sizes.edits);
    let mut missed = 0;
    let timeout = Duration::from_secs(10);
    ctx.quiet();
    let noise = Noise::start();
    crate::note(format_args!("live, {} edits", ctx.sizes.edits));
    for n in 0..ctx.sizes.edits {
        let rel = format!("edit/f{:02}.txt", n % FILES);
        let mut content = format!("edit {n}\n").into_bytes();
        content.extend(Rng::for_item(ctx.seed, "live", n as u64).text(1024));
        let started = Instant::now();
        std::fs::write(ws.join(&rel), &content).with_context(|| format!("write {rel}"))?;
        loop {
            if std::fs::read(mirror.join(&rel)).is_ok_and(|got| got == content) {
                latencies.push(secs(started.elapsed()));
                break;
            }
            if started.elapsed() > timeout {
                missed += 1;
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        if n % 100 == 99 {
            node.check_alive()?;
        }
    }
    ctx.report.add_all("live.latency_s", Unit::Secs, &latencies);
    ctx.report.detail(
        "live.summary",
        json!({"edits": ctx.sizes.edits, "missed_after_10s": missed, "poll_interval_ms": 0.5,
               "foreign_cpu_share": noise.share()}),
    );
    node.stop(Duration::from_secs(60))?;
    hub.stop()?;
    drop(hub);
    remove_tree(&base)?;
    Ok(())
}

/// Peak RSS (VmHWM) of hub and live node tracking the `track` dataset,
/// read once the hub holds every file and nothing is racy; rsync's peak
/// for the same tree (client, and the daemon's forked receiver) for scale.
pub fn rss(ctx: &mut Ctx) -> anyhow::Result<()> {
    let spec = ctx.sizes.track.clone();
    let (data, summary) = dataset::ensure(&ctx.data, &spec)?;
    ctx.report.detail("dataset.track", summary.to_json());
    let base = ctx.scratch("rss")?;
    let ws = base.join("ws");
    copy_tree(&data, &ws)?;
    std::thread::sleep(RACY_PAUSE);
    ctx.report
        .add("rss.files", Unit::Count, summary.files as f64);
    for r in 0..ctx.runs {
        let tag = format!("rss-r{r}");
        crate::note(format_args!("{tag}"));
        let hub_dir = base.join("hub");
        let state = base.join("node-state");
        remove_tree(&hub_dir)?;
        remove_tree(&state)?;
        let (mut hub, _) = ctx.start_hub(&hub_dir, &tag)?;
        ctx.quiet();
        let noise = Noise::start();
        let started = Instant::now();
        let mut node = ctx.start_node(&hub.url, &state, &ws, &tag)?;
        hub.wait_settled(WS, SETTLE_TIMEOUT, |w| {
            w["files"].as_u64() == Some(summary.files)
        })?;
        let synced = started.elapsed();
        std::thread::sleep(Duration::from_secs(3));
        node.check_alive()?;
        let (hub_hwm, hub_rss) = memory_kib(hub.daemon.pid)?;
        let (node_hwm, node_rss) = memory_kib(node.pid)?;
        let (hub_cpu, node_cpu) = (cpu_secs(hub.daemon.pid), cpu_secs(node.pid));
        ctx.report.add("rss.hub.hwm_kib", Unit::Kib, hub_hwm as f64);
        ctx.report
            .add("rss.node.hwm_kib", Unit::Kib, node_hwm as f64);
        ctx.report.add("rss.hub.rss_kib", Unit::Kib, hub_rss as f64);
        ctx.report
            .add("rss.node.rss_kib", Unit::Kib, node_rss as f64);
        ctx.report.add("rss.gm.sync_s", Unit::Secs, secs(synced));
        ctx.report.push_detail(
            "rss.runs",
            json!({"run": r, "sync_s": secs(synced), "foreign_cpu_share": noise.share(), "hub": {"hwm_kib": hub_hwm, "rss_kib": hub_rss, "cpu_s": hub_cpu},
                   "node": {"hwm_kib": node_hwm, "rss_kib": node_rss, "cpu_s": node_cpu}}),
        );
        node.stop(Duration::from_secs(60))?;
        hub.stop()?;
    }
    let rsyncd = Rsyncd::start(
        &base.join("rsyncd"),
        &base.join("rsync-dst"),
        &ctx.log("rss-rsyncd.log"),
    )?;
    ctx.quiet();
    let watch = TreeHwm::start(rsyncd.pid(), false);
    let run = rsync_with(ctx, &ws, rsyncd.port, &[], "rss-rsync", true)?;
    let daemon_hwm = watch.finish();
    ctx.report
        .add("rss.rsync.hub_hwm_kib", Unit::Kib, daemon_hwm as f64);
    ctx.report.add(
        "rss.rsync.node_hwm_kib",
        Unit::Kib,
        run.timed.peak_kib.unwrap_or(0) as f64,
    );
    ctx.report.detail("rss.rsync", run.to_json());
    drop(rsyncd);
    remove_tree(&base)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rsync_stats() {
        let text = "Number of files: 3\nTotal bytes sent: 1,234,567\nTotal bytes received: 89\nLiteral data: 1,048,576 bytes\nMatched data: 535,822,336 bytes\n";
        assert_eq!(stat_number(text, "Total bytes sent"), 1_234_567);
        assert_eq!(stat_number(text, "Total bytes received"), 89);
        assert_eq!(stat_number(text, "Literal data"), 1_048_576);
        assert_eq!(stat_number(text, "Matched data"), 535_822_336);
        assert_eq!(stat_number(text, "Missing"), 0);
    }
}
