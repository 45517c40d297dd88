//! Collected measurements and their presentation: every run's value of
//! every metric (JSON), medians and percentiles, and the one result table
//! (markdown) with ratios and met / not met against the targets.
//!
//! Scenarios only record metrics; the table is built here from whatever
//! metrics exist, so a skipped or failed scenario leaves its rows out.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Median (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// Nearest-rank percentile, `p` in 0..=100.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Secs,
    Bytes,
    BytesPerSec,
    Kib,
    Count,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Secs => "s",
            Unit::Bytes => "bytes",
            Unit::BytesPerSec => "bytes/s",
            Unit::Kib => "KiB",
            Unit::Count => "count",
        }
    }

    pub fn format(self, value: f64) -> String {
        match self {
            Unit::Secs if value < 1.0 => format!("{:.1} ms", value * 1e3),
            Unit::Secs => format!("{value:.2} s"),
            Unit::Bytes => format_bytes(value),
            Unit::BytesPerSec => format!("{}/s", format_bytes(value)),
            Unit::Kib => format_bytes(value * 1024.0),
            Unit::Count => format!("{value:.0}"),
        }
    }
}

pub fn format_bytes(value: f64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if value < 1024.0 {
        return format!("{value:.0} B");
    }
    let mut scaled = value / 1024.0;
    let mut unit = 0;
    while scaled >= 1024.0 && unit < UNITS.len() - 1 {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.2} {}", UNITS[unit])
}

struct Metric {
    unit: Unit,
    runs: Vec<f64>,
}

/// One row of the result table.
pub struct Row {
    pub scenario: String,
    pub ghostmirror: String,
    pub reference: String,
    pub fsync: String,
    pub ratio: String,
    pub target: String,
    pub met: String,
}

#[derive(Default)]
pub struct Report {
    metrics: BTreeMap<String, Metric>,
    details: serde_json::Map<String, Value>,
    errors: Vec<String>,
}

impl Report {
    /// Appends one run's value of a metric.
    pub fn add(&mut self, name: &str, unit: Unit, value: f64) {
        self.metrics
            .entry(name.to_string())
            .or_insert(Metric {
                unit,
                runs: Vec::new(),
            })
            .runs
            .push(value);
    }

    /// Records a whole distribution (e.g. 1,000 latencies) at once.
    pub fn add_all(&mut self, name: &str, unit: Unit, values: &[f64]) {
        for value in values {
            self.add(name, unit, *value);
        }
    }

    pub fn median(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).and_then(|m| median(&m.runs))
    }

    pub fn percentile(&self, name: &str, p: f64) -> Option<f64> {
        self.metrics.get(name).and_then(|m| percentile(&m.runs, p))
    }

    pub fn formatted(&self, name: &str) -> Option<String> {
        let metric = self.metrics.get(name)?;
        Some(metric.unit.format(median(&metric.runs)?))
    }

    /// Free-form detail for the JSON (per-run records, counters, notes).
    pub fn detail(&mut self, key: &str, value: Value) {
        self.details.insert(key.to_string(), value);
    }

    pub fn push_detail(&mut self, key: &str, value: Value) {
        let slot = self
            .details
            .entry(key.to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(items) = slot {
            items.push(value);
        }
    }

    pub fn error(&mut self, scenario: &str, error: &anyhow::Error) {
        let text = format!("{scenario}: {error:#}");
        crate::note(format_args!("FAILED {text}"));
        self.errors.push(text);
    }

    pub fn metrics_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (name, metric) in &self.metrics {
            let summary = if metric.runs.len() > 20 {
                json!({
                    "unit": metric.unit.name(),
                    "count": metric.runs.len(),
                    "median": median(&metric.runs),
                    "p99": percentile(&metric.runs, 99.0),
                    "max": percentile(&metric.runs, 100.0),
                    "runs": metric.runs,
                })
            } else {
                json!({"unit": metric.unit.name(), "median": median(&metric.runs), "runs": metric.runs})
            };
            out.insert(name.clone(), summary);
        }
        Value::Object(out)
    }

    pub fn details_json(&self) -> Value {
        Value::Object(self.details.clone())
    }

    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Builds the table from the metrics that exist.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let f = |name: &str| self.formatted(name).unwrap_or_else(|| "—".to_string());
        let ratio_row = |rows: &mut Vec<Row>,
                         scenario: &str,
                         gm: &str,
                         reference: &str,
                         ref_label: &str,
                         fsync: Option<&str>,
                         target: Option<f64>| {
            let (Some(g), Some(r)) = (self.median(gm), self.median(reference)) else {
                return;
            };
            let ratio = g / r;
            rows.push(Row {
                scenario: scenario.to_string(),
                ghostmirror: f(gm),
                reference: format!("{} ({ref_label})", f(reference)),
                fsync: fsync.map_or_else(|| "—".to_string(), f),
                ratio: format!("{ratio:.2}×"),
                target: target.map_or_else(|| "—".to_string(), |t| format!("≤ {t:.1}×")),
                met: target.map_or_else(|| "—".to_string(), |t| verdict_max(ratio, t, "×")),
            });
        };

        for (name, target) in [("src", Some(0.5)), ("large", Some(1.0)), ("mixed", None)] {
            ratio_row(
                &mut rows,
                &format!("initial sync `{name}`"),
                &format!("{name}.gm.wall_s"),
                &format!("{name}.rsync.wall_s"),
                "rsync",
                Some(&format!("{name}.rsync_fsync.wall_s")),
                target,
            );
        }
        if let (Some(gm), Some(limit)) = (
            self.median("large.gm.throughput"),
            self.median("limit.large_path.throughput"),
        ) {
            let share = gm / limit;
            rows.push(Row {
                scenario: "initial sync `large`, share of the limit".into(),
                ghostmirror: Unit::BytesPerSec.format(gm),
                reference: format!(
                    "{} (min of loopback, `cp -a`+sync)",
                    Unit::BytesPerSec.format(limit)
                ),
                fsync: "—".into(),
                ratio: format!("{:.0} %", share * 100.0),
                target: "≥ 70 %".into(),
                met: if share >= 0.70 {
                    "met".into()
                } else {
                    format!("not met ({:.0} points short)", (0.70 - share) * 100.0)
                },
            });
        }
        for cache in ["cold", "warm"] {
            ratio_row(
                &mut rows,
                &format!("node restart, no change, `src` ({cache})"),
                &format!("src.restart.gm.{cache}_s"),
                &format!("src.restart.rsync.{cache}_s"),
                "rsync quick-check",
                None,
                Some(0.5),
            );
        }
        for cache in ["cold", "warm"] {
            let gm = format!("hubrestart.gm.{cache}_s");
            let walk = format!("hubrestart.statwalk.{cache}_s");
            let (Some(g), Some(w)) = (self.median(&gm), self.median(&walk)) else {
                continue;
            };
            let hashed = self.percentile(&format!("hubrestart.gm.{cache}_hashed"), 100.0);
            let ratio = g / w;
            let mut misses = Vec::new();
            if g > 1.0 {
                misses.push(format!("{:.2} s over 1 s", g - 1.0));
            }
            if ratio > 1.5 {
                misses.push(format!("{:.2}× the stat walk, target 1.5×", ratio));
            }
            match hashed {
                Some(h) if h > 0.0 => misses.push(format!("{h:.0} files re-hashed")),
                None => misses.push("files_hashed unknown".into()),
                _ => {}
            }
            rows.push(Row {
                scenario: format!(
                    "hub restart, {} files ({cache})",
                    self.median("hubrestart.files").unwrap_or(0.0)
                ),
                ghostmirror: format!("{}, {} hashed", f(&gm), hashed.unwrap_or(-1.0)),
                reference: format!("{} (stat walk)", f(&walk)),
                fsync: "—".into(),
                ratio: format!("{ratio:.2}×"),
                target: "≤ 1 s, ≤ 1.5×, 0 hashed".into(),
                met: if misses.is_empty() {
                    "met".into()
                } else {
                    format!("not met: {}", misses.join("; "))
                },
            });
        }
        let big = self
            .median("overwrite.file_bytes")
            .map_or_else(|| "large".to_string(), |b| Unit::Bytes.format(b));
        if let (Some(g), Some(r)) = (
            self.median("overwrite.gm.wire_bytes"),
            self.median("overwrite.rsync.wire_bytes"),
        ) {
            let limit = 2.0 * 1024.0 * 1024.0;
            rows.push(Row {
                scenario: format!("1 MiB overwritten in the middle of a {big} file: bytes"),
                ghostmirror: Unit::Bytes.format(g),
                reference: format!("{} (rsync delta)", Unit::Bytes.format(r)),
                fsync: "—".into(),
                ratio: format!("{:.2}×", g / r),
                target: "≤ 2 MiB".into(),
                met: verdict_max(g / limit, 1.0, "× of 2 MiB"),
            });
        }
        ratio_row(
            &mut rows,
            &format!("1 MiB overwritten in the middle of a {big} file: wall"),
            "overwrite.gm.wall_s",
            "overwrite.rsync.wall_s",
            "rsync delta",
            Some("overwrite.rsync_fsync.wall_s"),
            Some(1.0),
        );
        if let Some(g) = self.median("rename.gm.wire_bytes") {
            let limit = 64.0 * 1024.0;
            rows.push(Row {
                scenario: "rename a directory of 500 files: bytes".into(),
                ghostmirror: Unit::Bytes.format(g),
                reference: format!(
                    "{} (rsync -a --delete)",
                    self.formatted("rename.rsync.wire_bytes")
                        .unwrap_or_else(|| "—".into())
                ),
                fsync: "—".into(),
                ratio: self
                    .median("rename.rsync.wire_bytes")
                    .map_or_else(|| "—".into(), |r| format!("{:.3}×", g / r)),
                target: "≤ 64 KiB".into(),
                met: verdict_max(g / limit, 1.0, "× of 64 KiB"),
            });
        }
        for (p, target) in [(50.0, 0.050), (99.0, 0.250)] {
            if let Some(v) = self.percentile("live.latency_s", p) {
                rows.push(Row {
                    scenario: format!(
                        "live edit → visible on hub, p{p:.0} of {}",
                        self.metrics
                            .get("live.latency_s")
                            .map_or(0, |m| m.runs.len())
                    ),
                    ghostmirror: Unit::Secs.format(v),
                    reference: "—".into(),
                    fsync: "—".into(),
                    ratio: "—".into(),
                    target: format!("≤ {:.0} ms", target * 1e3),
                    met: verdict_max(v / target, 1.0, "× the target"),
                });
            }
        }
        for side in ["hub", "node"] {
            if let Some(v) = self.median(&format!("rss.{side}.hwm_kib")) {
                rows.push(Row {
                    scenario: format!(
                        "peak RSS of the {side}, {} files tracked",
                        self.median("rss.files").unwrap_or(0.0)
                    ),
                    ghostmirror: Unit::Kib.format(v),
                    reference: format!(
                        "{} (rsync {})",
                        f(&format!("rss.rsync.{side}_hwm_kib")),
                        if side == "hub" {
                            "daemon side"
                        } else {
                            "client"
                        }
                    ),
                    fsync: "—".into(),
                    ratio: "—".into(),
                    target: "≤ 100 MiB".into(),
                    met: verdict_max(v / (100.0 * 1024.0), 1.0, "× of 100 MiB"),
                });
            }
        }
        rows
    }

    /// The limits, as a second small table.
    pub fn limit_rows(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut add = |label: &str, name: &str| {
            if let Some(v) = self.formatted(name) {
                out.push((label.to_string(), v));
            }
        };
        add("loopback TCP, one connection", "limit.loopback.throughput");
        add("BLAKE3, one thread, in memory", "limit.blake3.throughput");
        for ds in ["src", "large", "mixed"] {
            add(
                &format!("`cp -a` of `{ds}`"),
                &format!("limit.cp.{ds}.cp_s"),
            );
            add(
                &format!("`cp -a` + `sync` of `{ds}`"),
                &format!("limit.cp.{ds}.total_s"),
            );
        }
        add("stat walk of `src` (cold)", "limit.statwalk.src.cold_s");
        add("stat walk of `src` (warm)", "limit.statwalk.src.warm_s");
        out
    }
}

/// "met" when `value <= target`, else by how much it misses.
fn verdict_max(value: f64, target: f64, unit: &str) -> String {
    if value <= target {
        "met".to_string()
    } else {
        format!("not met ({value:.2}{unit}, {:.1}× over)", value / target)
    }
}

pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | ghostmirror | reference | rsync --fsync | ratio | target | met? |\n|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row.scenario, row.ghostmirror, row.reference, row.fsync, row.ratio, row.target, row.met
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
    }

    #[test]
    fn rows_come_from_existing_metrics_only() {
        let mut report = Report::default();
        assert!(report.rows().is_empty());
        for (gm, rsync) in [(1.0, 4.0), (2.0, 5.0), (3.0, 6.0)] {
            report.add("src.gm.wall_s", Unit::Secs, gm);
            report.add("src.rsync.wall_s", Unit::Secs, rsync);
        }
        let rows = report.rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].ratio, "0.40×");
        assert_eq!(rows[0].met, "met");
        assert_eq!(format_bytes(3.0 * 1024.0 * 1024.0), "3.00 MiB");
    }
}
