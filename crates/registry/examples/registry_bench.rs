//! Registry list latency at scale: fills a registry with agent instances
//! (batched inserts), then times pages of `list_instances` filtered by node
//! and by session, starting at random cursors, and prints p50/p99 per
//! backend.
//!
//!     cargo run --release -p gm-registry --example registry_bench -- \
//!         --instances 1000000 [--postgres URL] [--no-sqlite]
//!
//! SQLite runs in a fresh file in a temp dir (same settings as the hub:
//! WAL, synchronous=FULL). PostgreSQL runs in a fresh schema of the
//! database at URL (dropped at the end). Both go through the same
//! `Registry` calls the hub's gRPC service makes. Options: --nodes 1000,
//! --sessions 10000, --templates 20, --iterations 5000, --limit 100,
//! --seed 42, --sqlite-path FILE (keep the SQLite file; reuse its rows if
//! it has some), --pg-schema NAME (the same for PostgreSQL), --no-sqlite.

use std::time::{Duration, Instant};

use gm_core::{NodeId, WorkspaceId};
use gm_registry::types::cursor_for_instance;
use gm_registry::{
    BulkInstance, InstanceFilter, InstanceId, InstanceStatus, NewTemplate, Page, Registry,
    TemplateName,
};
use rand::{Rng, SeedableRng};

struct Options {
    instances: usize,
    nodes: usize,
    sessions: usize,
    templates: usize,
    iterations: usize,
    limit: u32,
    seed: u64,
    postgres: Option<String>,
    sqlite: bool,
    /// Keep the SQLite file here; if it already holds instances, reuse them.
    sqlite_path: Option<std::path::PathBuf>,
    /// Keep the PostgreSQL rows in this schema; if it holds instances, reuse them.
    pg_schema: Option<String>,
}

fn parse() -> Result<Options, String> {
    let mut options = Options {
        instances: 1_000_000,
        nodes: 1000,
        sessions: 10_000,
        templates: 20,
        iterations: 5000,
        limit: 100,
        seed: 42,
        postgres: None,
        sqlite: true,
        sqlite_path: None,
        pg_schema: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--no-sqlite" {
            options.sqlite = false;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value:?}: {e}"))
        };
        match flag.as_str() {
            "--instances" => options.instances = number()?,
            "--nodes" => options.nodes = number()?,
            "--sessions" => options.sessions = number()?,
            "--templates" => options.templates = number()?,
            "--iterations" => options.iterations = number()?,
            "--limit" => options.limit = number()? as u32,
            "--seed" => options.seed = number()? as u64,
            "--postgres" => options.postgres = Some(value),
            "--sqlite-path" => options.sqlite_path = Some(value.into()),
            "--pg-schema" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    return Err(format!("--pg-schema {value:?}: use a-z and _"));
                }
                options.pg_schema = Some(value)
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if options.nodes == 0 || options.sessions == 0 || options.templates == 0 {
        return Err("--nodes, --sessions and --templates must be at least 1".into());
    }
    Ok(options)
}

/// Status mix of a mesh that has run a while: most instances are done.
fn status(rng: &mut impl Rng) -> InstanceStatus {
    match rng.random_range(0..100) {
        0..70 => InstanceStatus::Stopped,
        70..90 => InstanceStatus::Running,
        90..97 => InstanceStatus::Pending,
        _ => InstanceStatus::Failed,
    }
}

async fn fill(registry: &Registry, options: &Options) -> Result<Duration, String> {
    let started = Instant::now();
    let nodes: Vec<NodeId> = (0..options.nodes)
        .map(|i| NodeId::new(&format!("node-{i:05}")).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let sessions: Vec<WorkspaceId> = (0..options.sessions)
        .map(|i| WorkspaceId::new(&format!("session-{i:06}")).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut templates = Vec::new();
    for i in 0..options.templates {
        let name = TemplateName::new(&format!("template-{i:03}")).map_err(|e| e.to_string())?;
        let new = NewTemplate::new(name, "bench", None).map_err(|e| e.to_string())?;
        templates.push(
            registry
                .create_template(&new)
                .await
                .map_err(|e| e.to_string())?
                .id,
        );
    }
    registry
        .bulk_insert(&nodes, &sessions, &[])
        .await
        .map_err(|e| e.to_string())?;
    // Instances arrive over time, interleaved across nodes and sessions.
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut done = 0;
    while done < options.instances {
        let batch = (options.instances - done).min(50_000);
        let rows: Vec<BulkInstance> = (0..batch)
            .map(|_| BulkInstance {
                template_id: templates[rng.random_range(0..templates.len())],
                node: nodes[rng.random_range(0..nodes.len())].clone(),
                session: sessions[rng.random_range(0..sessions.len())].clone(),
                status: status(&mut rng),
            })
            .collect();
        registry
            .bulk_insert(&[], &[], &rows)
            .await
            .map_err(|e| e.to_string())?;
        done += batch;
    }
    registry.analyze().await.map_err(|e| e.to_string())?;
    Ok(started.elapsed())
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
    rows: f64,
}

async fn time_pages(
    registry: &Registry,
    options: &Options,
    filter_for: impl Fn(&mut rand::rngs::StdRng) -> InstanceFilter,
) -> Result<Stats, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed + 1);
    let max_id = options.instances as i64;
    let warmup = options.iterations / 10;
    let mut times = Vec::with_capacity(options.iterations);
    let mut rows = 0usize;
    for i in 0..warmup + options.iterations {
        let filter = filter_for(&mut rng);
        // A random place in the list: the first page or one deep inside.
        let after = if rng.random_range(0..10) == 0 {
            String::new()
        } else {
            cursor_for_instance(InstanceId(rng.random_range(1..=max_id.max(1))))
        };
        let page = Page::new(options.limit, &after).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let got = registry
            .list_instances(&filter, &page)
            .await
            .map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        if i >= warmup {
            times.push(elapsed);
            rows += got.items.len();
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok(Stats {
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
        rows: rows as f64 / times.len() as f64,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

async fn bench(name: &str, registry: &Registry, options: &Options) -> Result<(), String> {
    let existing = registry
        .list_instances(
            &InstanceFilter::default(),
            &Page::first(1).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| e.to_string())?;
    let filled = if existing.items.is_empty() {
        eprintln!("{name}: filling {} instances…", options.instances);
        fill(registry, options).await?
    } else {
        eprintln!("{name}: reusing the instances already there");
        Duration::ZERO
    };
    eprintln!("{name}: filled in {:.1} s", filled.as_secs_f64());
    let nodes = options.nodes;
    let sessions = options.sessions;
    let by_node = time_pages(registry, options, |rng| InstanceFilter {
        node: NodeId::new(&format!("node-{:05}", rng.random_range(0..nodes))).ok(),
        ..Default::default()
    })
    .await?;
    let by_session = time_pages(registry, options, |rng| InstanceFilter {
        session: WorkspaceId::new(&format!("session-{:06}", rng.random_range(0..sessions))).ok(),
        ..Default::default()
    })
    .await?;
    println!("{name}: load average {} after timing", load());
    println!(
        "{name}: {} instances ({} nodes, {} sessions), filled in {:.1} s; {} pages of {} per list",
        options.instances,
        options.nodes,
        options.sessions,
        filled.as_secs_f64(),
        options.iterations,
        options.limit
    );
    for (list, stats) in [("by node", &by_node), ("by session", &by_session)] {
        println!(
            "{name}: list {list:<10} p50 {}  p99 {}  max {}  ({:.1} rows/page)",
            ms(stats.p50),
            ms(stats.p99),
            ms(stats.max),
            stats.rows
        );
    }
    Ok(())
}

/// The 1-minute load average, to show how busy the machine was.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

async fn main_async() -> Result<(), String> {
    let options = parse()?;
    println!(
        "machine: {} cores, load average {} at start",
        std::thread::available_parallelism().map_or(0, usize::from),
        load()
    );
    if options.sqlite {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = options
            .sqlite_path
            .clone()
            .unwrap_or_else(|| dir.path().join("state.db"));
        let registry = Registry::open_sqlite(&path)
            .await
            .map_err(|e| e.to_string())?;
        bench("SQLite", &registry, &options).await?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        println!("SQLite: database file {} MiB", size >> 20);
        registry.close().await;
    }
    if let Some(url) = &options.postgres {
        use sqlx::Connection;
        let schema = options
            .pg_schema
            .clone()
            .unwrap_or_else(|| format!("gm_bench_{:016x}", rand::random::<u64>()));
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .map_err(|e| format!("connect to PostgreSQL: {e}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
        let separator = if url.contains('?') { '&' } else { '?' };
        let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");
        let result = async {
            let registry = Registry::open_postgres(&scoped)
                .await
                .map_err(|e| e.to_string())?;
            bench("PostgreSQL", &registry, &options).await?;
            registry.close().await;
            Ok::<_, String>(())
        }
        .await;
        if options.pg_schema.is_none() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        }
        result?;
    }
    Ok(())
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(main_async()) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
