//! The `ghostmirror` binary: parses flags (each with a `GM_*` environment
//! variable), sets up logging and signals, and calls into the library
//! crates. The only place that prints to stdout.

mod args;
mod client;
mod progress;
mod registry_cmd;
mod skill_cmd;
mod status;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use args::{Cli, Command, LogFormat};

/// glibc gives every thread that allocates its own malloc arena (up to 8 per
/// core), and the blocking pool runs many short-lived threads: measured on
/// the hub syncing 20,000 files, peak RSS 143 MiB with the default and
/// 98 MiB with arenas capped. One arena per core keeps contention low.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes allocator tuning; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Hub(args) => {
            let (config, listen, admin_listen) = args.into_config()?;
            let grpc = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {listen} (--listen / GM_LISTEN): {e}")
            })?;
            let admin = tokio::net::TcpListener::bind(admin_listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot listen on {admin_listen} (--admin-listen / GM_ADMIN_LISTEN): {e}"
                    )
                })?;
            gm_hub::run(config, grpc, admin, shutdown_on_signal()).await
        }
        Command::Node(args) => {
            let config = args.into_config()?;
            let progress = std::sync::Arc::new(gm_node::Progress::default());
            let shown = CancellationToken::new();
            let reporter = config
                .once
                .then(|| tokio::spawn(progress::report(progress.clone(), shown.clone())));
            let result = gm_node::run(config, shutdown_on_signal(), progress).await;
            shown.cancel();
            if let Some(reporter) = reporter {
                let _ = reporter.await;
            }
            result
        }
        Command::Status(args) => status::run(args).await,
        Command::Purge(args) => status::purge(args).await,
        Command::ConfirmEmpty(args) => args.run(),
        Command::Session(args) => registry_cmd::run_session(args).await,
        Command::Template(args) => registry_cmd::run_template(args).await,
        Command::Instance(args) => registry_cmd::run_instance(args).await,
        Command::Nodes(args) => registry_cmd::run_nodes(args).await,
        Command::Token(args) => registry_cmd::run_token(args).await,
        Command::Skill(args) => skill_cmd::run(args).await,
    }
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::error!(error = %err, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        trigger.cancel();
    });
    token
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
