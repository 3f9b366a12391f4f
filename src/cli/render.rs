//! Rendering engine events: cargo-style status lines, indicatif spinners on
//! a terminal, or JSON lines for machines.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::{Event, Reporter, StageStatus};
use crate::project::{BuildReport, Project};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Human,
    Verbose,
    Json,
}

pub struct CliReporter {
    mode: Mode,
    bars: Option<MultiProgress>,
    running: Mutex<BTreeMap<String, ProgressBar>>,
}

impl CliReporter {
    pub fn new(mode: Mode) -> Self {
        let bars = (mode == Mode::Human && std::io::stderr().is_terminal()).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        CliReporter { mode, bars, running: Mutex::new(BTreeMap::new()) }
    }

    fn line(&self, text: String) {
        match &self.bars {
            Some(bars) => bars.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    pub fn clear(&self) {
        for (_, bar) in std::mem::take(&mut *self.running.lock().expect("bars lock")) {
            bar.finish_and_clear();
        }
    }

    /// The closing lines of a build.
    pub fn finish(&self, project: &Project, report: &BuildReport) {
        self.clear();
        let count = |status| report.outcome.stages.iter().filter(|s| s.status == status).count();
        let (ran, cached, failed, skipped) = (count(StageStatus::Ran), count(StageStatus::Cached), count(StageStatus::Failed), count(StageStatus::Skipped));
        let fetched = count(StageStatus::Fetched);
        let output = &project.manifest.project.output_label;
        if self.mode == Mode::Json {
            let failed_stages: Vec<&str> = report.outcome.stages.iter().filter(|s| s.status == StageStatus::Failed).map(|s| s.stage.as_str()).collect();
            super::out(serde_json::json!({
                "event": "build",
                "status": if report.exit_code() == 0 { "ok" } else { "failed" },
                "exit_code": report.exit_code(),
                "ran": ran, "cached": cached, "fetched": fetched, "failed": failed_stages, "skipped": skipped,
                "output": output,
                "output_updated": report.output_updated,
                "kept": report.kept,
                "seconds": report.seconds,
            }));
            return;
        }
        for stage in report.outcome.stages.iter().filter(|s| s.status == StageStatus::Failed) {
            if let Some(error) = &stage.error {
                self.line(format!("error: stage `{}` failed: {}", stage.stage, error.message));
            }
        }
        let output_note = match report.output_updated {
            Some(true) => format!("; output `{output}` updated"),
            Some(false) => format!("; output `{output}` up to date"),
            None if report.exit_code() == 0 => {
                format!("; output `{output}` not assembled for a partial build")
            }
            None => format!("; output `{output}` left as it was"),
        };
        if self.mode == Mode::Verbose {
            for path in &report.kept {
                self.line(format!("{:>12} `{output}/{path}` (not written by symb)", "Kept"));
            }
        }
        let word = if report.exit_code() == 0 { "Finished" } else { "Failed" };
        let mut parts = vec![format!("{ran} ran"), format!("{cached} cached")];
        if fetched > 0 {
            parts.push(format!("{fetched} fetched"));
        }
        if failed > 0 {
            parts.push(format!("{failed} failed"));
        }
        if skipped > 0 {
            parts.push(format!("{skipped} skipped"));
        }
        self.line(format!("{word:>12} {} in {:.2}s{output_note}", parts.join(", "), report.seconds));
    }
}

impl Reporter for CliReporter {
    fn event(&self, event: Event<'_>) {
        match event {
            Event::WaitingForLock => self.line(format!("{:>12} for another build to release the cache lock", "Blocking")),
            Event::StageStarted { stage, reason } => {
                if self.mode == Mode::Json {
                    return;
                }
                self.line(format!("{:>12} {stage} ({reason})", "Running"));
                if let Some(bars) = &self.bars {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(ProgressStyle::with_template("{spinner} {prefix:>10} {msg} [{elapsed}]").expect("template is valid"));
                    bar.set_prefix(stage.to_string());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    self.running.lock().expect("bars lock").insert(stage.to_string(), bar);
                }
            }
            Event::StageProgress { stage, done, total, message } => {
                if let Some(bar) = self.running.lock().expect("bars lock").get(stage) {
                    if total > 0 && bar.length() != Some(total) {
                        bar.set_style(ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} [{elapsed}]").expect("template is valid").progress_chars("=> "));
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                    bar.set_message(message.to_string());
                }
            }
            Event::StageFinished(outcome) => {
                if let Some(bar) = self.running.lock().expect("bars lock").remove(&outcome.stage) {
                    bar.finish_and_clear();
                }
                match self.mode {
                    Mode::Json => {
                        let mut line = serde_json::json!({
                            "event": "stage",
                            "stage": outcome.stage,
                            "status": outcome.status,
                            "reason": outcome.error.as_ref().map(|e| e.message.clone()).unwrap_or_else(|| outcome.reason.clone()),
                            "seconds": outcome.seconds,
                        });
                        if outcome.status == StageStatus::Fetched {
                            line["bytes"] = outcome.fetched_bytes.into();
                        }
                        super::out(line)
                    }
                    Mode::Human | Mode::Verbose => match outcome.status {
                        StageStatus::Ran => self.line(format!("{:>12} {} in {:.2}s", "Ran", outcome.stage, outcome.seconds)),
                        StageStatus::Fetched => self.line(format!("{:>12} {} ({} {} in {:.2}s)", "Fetched", outcome.stage, bytes(outcome.fetched_bytes), outcome.reason, outcome.seconds)),
                        StageStatus::Cached if self.mode == Mode::Verbose => self.line(format!("{:>12} {}", "Fresh", outcome.stage)),
                        StageStatus::Cached => {}
                        StageStatus::Failed => self.line(format!("{:>12} {}", "Failed", outcome.stage)),
                        StageStatus::Skipped => self.line(format!("{:>12} {} ({})", "Skipped", outcome.stage, outcome.reason)),
                    },
                }
            }
            Event::CorruptBlob { message } => self.line(format!("{:>12} {message}", "Corrupt")),
            Event::RemoteWarning { message } if self.mode == Mode::Json => super::out(serde_json::json!({"event": "warning", "message": message})),
            Event::RemoteWarning { message } => self.line(format!("warning: {message}")),
        }
    }
}

/// Bytes in a human unit.
pub fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", units[unit]) }
}
