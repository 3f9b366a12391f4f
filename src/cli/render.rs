//! Rendering engine events: cargo-style status lines (coloured on a
//! terminal), indicatif spinners on a terminal, a progress line every few
//! seconds elsewhere (a pipe, a CI log), or JSON lines for machines.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::ColorChoice;
use crate::engine::{Event, Reporter, StageStatus, join};
use crate::project::{BuildReport, Project};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Warnings and errors only.
    Quiet,
    Human,
    Verbose,
    Json,
}

static COLOR: AtomicBool = AtomicBool::new(false);

/// Decides once whether stderr gets colour: `always` and `never` as said;
/// `auto` on a terminal unless `NO_COLOR` is set (and not empty) or `TERM`
/// is `dumb`.
pub fn set_color(choice: ColorChoice) {
    let on = match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::io::stderr().is_terminal()
                && std::env::var("TERM").map_or(true, |t| t != "dumb")
        }
    };
    COLOR.store(on, Ordering::Relaxed);
}

pub fn color() -> bool {
    COLOR.load(Ordering::Relaxed)
}

/// A status word's colour, as cargo's.
#[derive(Clone, Copy)]
pub enum Tone {
    /// Work done or fine (green).
    Good,
    /// Waiting or informative (cyan).
    Note,
    /// A warning (yellow).
    Warn,
    /// A failure (red).
    Bad,
}

fn paint(text: &str, tone: Tone) -> String {
    if !color() {
        return text.to_string();
    }
    let code = match tone {
        Tone::Good => "32",
        Tone::Note => "36",
        Tone::Warn => "33",
        Tone::Bad => "31",
    };
    format!("\x1b[1;{code}m{text}\x1b[0m")
}

/// A status line: the word right-aligned in 12 columns, coloured.
pub fn status(word: &str, tone: Tone, rest: &str) -> String {
    format!("{} {rest}", paint(&format!("{word:>12}"), tone))
}

/// `error: …` and `warning: …` lines with their prefix coloured.
pub fn diagnostic(text: &str) -> String {
    for (prefix, tone) in [("error", Tone::Bad), ("warning", Tone::Warn)] {
        // `warning:` or `warning[code]:`
        if text.starts_with(prefix)
            && let Some(end) = text.find(':')
            && (end == prefix.len() || text[prefix.len()..].starts_with('['))
        {
            let (head, rest) = text.split_at(end + 1);
            return format!("{}{rest}", paint(head, tone));
        }
    }
    text.to_string()
}

/// A running stage: when it started, when its last plain progress line went
/// out, and its latest (done, total).
type Running = (Instant, Option<Instant>, Option<(u64, u64)>);

/// Seconds between two progress lines of one stage when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub struct CliReporter {
    mode: Mode,
    bars: Option<MultiProgress>,
    running: Mutex<BTreeMap<String, ProgressBar>>,
    /// Per running stage: when it started, when its last plain progress line
    /// went out, and its latest progress (for Ctrl-C's message).
    plain: Mutex<BTreeMap<String, Running>>,
}

impl CliReporter {
    pub fn new(mode: Mode) -> Self {
        let bars = (mode == Mode::Human && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        CliReporter {
            mode,
            bars,
            running: Mutex::new(BTreeMap::new()),
            plain: Mutex::new(BTreeMap::new()),
        }
    }

    fn line(&self, text: String) {
        if self.mode == Mode::Quiet {
            return;
        }
        self.always(text);
    }

    /// A line even in quiet mode (warnings and errors).
    fn always(&self, text: String) {
        let text = diagnostic(&text);
        match &self.bars {
            Some(bars) => bars.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    /// What Ctrl-C stopped: each running stage, with its progress, and that
    /// the next build takes up from there.
    pub fn interrupted(&self) {
        self.clear();
        let running = std::mem::take(&mut *self.plain.lock().unwrap_or_else(|e| e.into_inner()));
        if self.mode == Mode::Json {
            let stages: Vec<serde_json::Value> = running.iter().map(|(stage, (_, _, p))| serde_json::json!({"stage": stage, "step": p.map(|p| p.0), "total": p.map(|p| p.1)})).collect();
            super::out(serde_json::json!({"event": "interrupted", "running": stages}));
        }
        let what: Vec<String> = running
            .iter()
            .map(|(stage, (_, _, p))| match p {
                Some((done, total)) if *total > 0 => format!("{stage} at {done} of {total}"),
                _ => stage.clone(),
            })
            .collect();
        let stopped = if what.is_empty() {
            "the build".to_string()
        } else {
            what.join(", ")
        };
        eprintln!(
            "{}",
            status(
                "Interrupted",
                Tone::Warn,
                &format!(
                    "stopped {stopped}; finished stages are cached and a stage that checkpoints \
                        (finetune) resumes from its last checkpoint: run `symb build` again"
                )
            )
        );
    }

    pub fn clear(&self) {
        for (_, bar) in std::mem::take(&mut *self.running.lock().expect("bars lock")) {
            bar.finish_and_clear();
        }
    }

    /// The closing lines of a build.
    pub fn finish(&self, project: &Project, report: &BuildReport) {
        self.clear();
        let count = |status| {
            report
                .outcome
                .stages
                .iter()
                .filter(|s| s.status == status)
                .count()
        };
        let (ran, cached, failed, skipped) = (
            count(StageStatus::Ran),
            count(StageStatus::Cached),
            count(StageStatus::Failed),
            count(StageStatus::Skipped),
        );
        let fetched = count(StageStatus::Fetched);
        let remote = count(StageStatus::Remote);
        let output = &project.manifest.project.output_label;
        let warnings: usize = report
            .outcome
            .stages
            .iter()
            .filter_map(|s| s.record.as_ref())
            .map(|r| r.warnings.len())
            .sum();
        if self.mode == Mode::Json {
            let failed_stages: Vec<&str> = report
                .outcome
                .stages
                .iter()
                .filter(|s| s.status == StageStatus::Failed)
                .map(|s| s.stage.as_str())
                .collect();
            super::out(serde_json::json!({
                "event": "build",
                "warnings": warnings,
                "status": if report.outcome.failure().is_none() { "ok" } else { "failed" },
                "exit_code": super::Exit::of(report.outcome.failure()).code(),
                "ran": ran, "remote": remote, "cached": cached, "fetched": fetched, "failed": failed_stages, "skipped": skipped,
                "output": output,
                "output_updated": report.output_updated,
                "kept": report.kept,
                "seconds": report.seconds,
            }));
            return;
        }
        for stage in report
            .outcome
            .stages
            .iter()
            .filter(|s| s.status == StageStatus::Failed)
        {
            if let Some(error) = &stage.error {
                self.always(format!(
                    "error: stage `{}` failed: {}",
                    stage.stage, error.message
                ));
            }
        }
        let output_note = match report.output_updated {
            Some(true) => format!("; output `{output}` updated"),
            Some(false) => format!("; output `{output}` up to date"),
            None if report.outcome.failure().is_none() => {
                format!(
                    "; output `{output}` left as it was: `--target` builds part of the plan, and \
                    a folder of part of its files would not load; `symb build` assembles it, \
                    running only what `--target` left out"
                )
            }
            None => format!("; output `{output}` left as it was"),
        };
        if self.mode == Mode::Verbose {
            for path in &report.kept {
                self.line(status(
                    "Kept",
                    Tone::Note,
                    &format!("`{output}/{path}` (not written by symb)"),
                ));
            }
        }
        let (word, tone) = if report.outcome.failure().is_none() {
            ("Finished", Tone::Good)
        } else {
            ("Failed", Tone::Bad)
        };
        let mut parts = vec![format!("{ran} ran"), format!("{cached} cached")];
        if remote > 0 {
            parts.push(format!("{remote} ran remotely"));
        }
        if fetched > 0 {
            parts.push(format!("{fetched} fetched"));
        }
        if failed > 0 {
            parts.push(format!("{failed} failed"));
        }
        if skipped > 0 {
            let names: Vec<String> = report
                .outcome
                .stages
                .iter()
                .filter(|s| s.status == StageStatus::Skipped)
                .map(|s| format!("`{}`", s.stage))
                .collect();
            let shown = if names.len() <= 3 {
                names.join(", ")
            } else {
                format!("{} and {} more", names[..2].join(", "), names.len() - 2)
            };
            parts.push(format!("{skipped} skipped ({shown})"));
        }
        if warnings > 0 {
            parts.push(format!(
                "{warnings} warning{}",
                if warnings == 1 { "" } else { "s" }
            ));
        }
        self.line(status(
            word,
            tone,
            &format!(
                "{} in {:.2}s{output_note}",
                parts.join(", "),
                report.seconds
            ),
        ));
    }
}

impl Reporter for CliReporter {
    fn event(&self, event: Event<'_>) {
        match event {
            Event::WaitingForLock => self.line(status(
                "Blocking",
                Tone::Note,
                "waiting for another build to release the cache lock",
            )),
            Event::StageStarted { stage, reason } => {
                self.plain
                    .lock()
                    .expect("progress lock")
                    .insert(stage.to_string(), (Instant::now(), None, None));
                match self.mode {
                    Mode::Json => super::out(
                        serde_json::json!({"event": "stage_started", "stage": stage, "reason": reason}),
                    ),
                    Mode::Verbose => self.line(status(
                        "Running",
                        Tone::Good,
                        &format!("{stage} ({reason})"),
                    )),
                    Mode::Human | Mode::Quiet => {}
                }
                if let Some(bars) = &self.bars {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {prefix:>10} {msg} [{elapsed}]")
                            .expect("template is valid"),
                    );
                    bar.set_prefix(stage.to_string());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    self.running
                        .lock()
                        .expect("bars lock")
                        .insert(stage.to_string(), bar);
                }
            }
            Event::StageProgress {
                stage,
                done,
                total,
                message,
                fields,
            } => {
                let now = Instant::now();
                let due = {
                    let mut plain = self.plain.lock().expect("progress lock");
                    let entry = plain.entry(stage.to_string()).or_insert((now, None, None));
                    entry.2 = Some((done, total));
                    let since = entry.1.unwrap_or(entry.0);
                    let due = now.duration_since(since) >= PLAIN_PROGRESS_EVERY;
                    if due {
                        entry.1 = Some(now);
                    }
                    due
                };
                match self.mode {
                    Mode::Json => {
                        let mut line = serde_json::json!({"event": "progress", "stage": stage, "step": done, "total": total, "message": message});
                        for (name, value) in fields {
                            line[*name] = serde_json::json!(value);
                        }
                        super::out(line);
                    }
                    Mode::Human | Mode::Verbose if self.bars.is_none() && due => {
                        let of = if total > 0 {
                            format!(" {done}/{total}")
                        } else {
                            String::new()
                        };
                        self.line(status(
                            "Progress",
                            Tone::Note,
                            &format!("{stage}{of}: {message}"),
                        ));
                    }
                    _ => {}
                }
                if let Some(bar) = self.running.lock().expect("bars lock").get(stage) {
                    if total > 0 && bar.length() != Some(total) {
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>12} [{bar:30}] {pos}/{len} {msg} [{elapsed}]",
                            )
                            .expect("template is valid")
                            .progress_chars("=> "),
                        );
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                    bar.set_message(message.to_string());
                }
            }
            Event::StageNote { stage, message } => match self.mode {
                Mode::Json => super::out(
                    serde_json::json!({"event": "note", "stage": stage, "message": message}),
                ),
                _ => self.line(status("Note", Tone::Note, &format!("{stage}: {message}"))),
            },
            Event::StageJob {
                stage,
                job,
                message,
            } => match self.mode {
                Mode::Json => super::out(
                    serde_json::json!({"event": "job", "stage": stage, "job": job, "message": message}),
                ),
                _ => self.line(status("Remote", Tone::Note, &format!("{stage}: {message}"))),
            },
            Event::StageFinished(outcome) => {
                self.plain
                    .lock()
                    .expect("progress lock")
                    .remove(&outcome.stage);
                if let Some(bar) = self
                    .running
                    .lock()
                    .expect("bars lock")
                    .remove(&outcome.stage)
                {
                    bar.finish_and_clear();
                }
                // The reason: whole in -v, without digests otherwise.
                let why = if outcome.reasons.is_empty() {
                    outcome.reason.clone()
                } else {
                    join(&outcome.reasons, self.mode != Mode::Verbose)
                };
                match self.mode {
                    Mode::Json => {
                        let mut line = serde_json::json!({
                            "event": "stage",
                            "stage": outcome.stage,
                            "status": outcome.status,
                            "reason": outcome.error.as_ref().map(|e| e.message.clone()).unwrap_or_else(|| outcome.reason.clone()),
                            "seconds": outcome.seconds,
                        });
                        if !outcome.reasons.is_empty() {
                            line["reasons"] =
                                serde_json::to_value(&outcome.reasons).expect("reasons serialise");
                        }
                        if outcome.status == StageStatus::Fetched {
                            line["bytes"] = outcome.fetched_bytes.into();
                        }
                        if let Some(job) = &outcome.job {
                            line["job"] = job.as_str().into();
                        }
                        if outcome.status == StageStatus::Remote
                            && let Some(record) = &outcome.record
                        {
                            // The stage's own time on the worker; `seconds` is the wait here.
                            line["stage_seconds"] = record.seconds.into();
                        }
                        super::out(line)
                    }
                    Mode::Human | Mode::Verbose | Mode::Quiet => match outcome.status {
                        StageStatus::Ran => self.line(status(
                            "Ran",
                            Tone::Good,
                            &format!("{} in {:.2}s ({why})", outcome.stage, outcome.seconds),
                        )),
                        StageStatus::Fetched => self.line(status(
                            "Fetched",
                            Tone::Good,
                            &format!(
                                "{} ({} {} in {:.2}s)",
                                outcome.stage,
                                bytes(outcome.fetched_bytes),
                                outcome.reason,
                                outcome.seconds
                            ),
                        )),
                        StageStatus::Remote => self.line(status(
                            "Ran",
                            Tone::Good,
                            &format!(
                                "{} remotely in {:.2}s (job {}; {why})",
                                outcome.stage,
                                outcome.seconds,
                                outcome.job.as_deref().unwrap_or("?")
                            ),
                        )),
                        StageStatus::Cached if self.mode == Mode::Verbose => {
                            self.line(status("Fresh", Tone::Good, &outcome.stage))
                        }
                        StageStatus::Cached => {}
                        StageStatus::Failed if why.is_empty() => {
                            self.always(status("Failed", Tone::Bad, &outcome.stage))
                        }
                        StageStatus::Failed => self.always(status(
                            "Failed",
                            Tone::Bad,
                            &format!("{} ({why})", outcome.stage),
                        )),
                        // One by one with -v; else the last line counts them.
                        StageStatus::Skipped if self.mode == Mode::Verbose => self.line(status(
                            "Skipped",
                            Tone::Warn,
                            &format!("{} ({})", outcome.stage, outcome.reason),
                        )),
                        StageStatus::Skipped => {}
                    },
                }
                // What the stage warned of, whether it ran now or earlier
                // (after its line).
                for warning in outcome.record.iter().flat_map(|r| &r.warnings) {
                    match self.mode {
                        Mode::Json => super::out(serde_json::json!({
                            "event": "warning",
                            "stage": outcome.stage,
                            "code": warning.code,
                            "message": warning.message,
                            "help": warning.help,
                        })),
                        _ => self.always(format!(
                            "warning[{}]: {}: {}\n{:>12} {}",
                            warning.code, outcome.stage, warning.message, "help:", warning.help
                        )),
                    }
                }
            }
            Event::CorruptBlob { message } => self.always(status("Corrupt", Tone::Warn, message)),
            Event::RemoteWarning { message } if self.mode == Mode::Json => {
                super::out(serde_json::json!({"event": "warning", "message": message}))
            }
            Event::RemoteWarning { message } => self.always(format!("warning: {message}")),
            Event::Uploaded {
                store,
                records,
                bytes: sent,
                seconds,
            } => {
                let rate = if seconds > 0.0 {
                    sent as f64 / 1e6 / seconds
                } else {
                    0.0
                };
                match self.mode {
                    Mode::Json => super::out(
                        serde_json::json!({"event": "upload", "store": store, "records": records, "bytes": sent, "seconds": seconds, "mb_per_second": rate}),
                    ),
                    _ => self.line(status(
                        "Uploaded",
                        Tone::Good,
                        &format!(
                            "{records} stages to {store} ({} in {seconds:.2}s, {rate:.1} MB/s)",
                            bytes(sent)
                        ),
                    )),
                }
            }
        }
    }
}

/// The line Ctrl-C prints for each remote job it stopped.
pub fn stopped_job(job: &str, address: &str) -> String {
    status(
        "Stopped",
        Tone::Warn,
        &format!("Ray job {job} at {address}"),
    )
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
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}
