//! Progress of `ghostmirror node --once`: a bar (files, bytes, rate, ETA)
//! when stderr is a terminal, a plain line every few seconds otherwise
//! and one with the final figures.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_node::Progress;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// Shows `progress` until `done` is cancelled.
pub async fn report(progress: Arc<Progress>, done: CancellationToken) {
    if std::io::stderr().is_terminal() {
        bar(progress, done).await
    } else {
        lines(progress, done).await
    }
}

async fn bar(progress: Arc<Progress>, done: CancellationToken) {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{spinner} [{bar:30}] {bytes}/{total_bytes} {msg} {bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    loop {
        let (files_done, files_total, bytes_done, bytes_total) = progress.snapshot();
        bar.set_length(bytes_total.max(1));
        bar.set_position(bytes_done);
        bar.set_message(format!("{files_done}/{files_total} files"));
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    bar.finish_and_clear();
}

async fn lines(progress: Arc<Progress>, done: CancellationToken) {
    let started = Instant::now();
    let mut last = (0, 0, 0, 0);
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let now = progress.snapshot();
        if now != last {
            last = now;
            line(now, started, "progress");
        }
    }
    // The figures at the end, once, if anything was planned.
    let now = progress.snapshot();
    if now.1 > 0 {
        line(now, started, "progress (done)");
    }
}

fn line(now: (u64, u64, u64, u64), started: Instant, what: &str) {
    let (files_done, files_total, bytes_done, bytes_total) = now;
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    let rate = bytes_done as f64 / elapsed;
    let eta = if rate > 0.0 && bytes_total > bytes_done {
        format!("{:.0}s", (bytes_total - bytes_done) as f64 / rate)
    } else {
        "-".into()
    };
    eprintln!(
        "{what}: {files_done}/{files_total} files, {}/{}, {}/s, eta {eta}",
        HumanBytes(bytes_done),
        HumanBytes(bytes_total),
        HumanBytes(rate as u64)
    );
}
