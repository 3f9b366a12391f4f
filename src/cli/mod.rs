//! The command line: argument parsing, and the only place that prints.

mod exit;
mod render;

pub use exit::Exit;

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand};

use crate::dtype::Dtype;
use crate::engine::BuildOptions;
use crate::project::{Project, ProjectError};
use render::{CliReporter, Mode};

/// The recipes `symb init --recipe NAME` can write.
pub const RECIPES: [(&str, &str); 6] = [
    // The example at the repository's root is this recipe (one file, not two copies).
    ("symbiotic", include_str!("../../symb.toml.example")),
    ("gpt2-lora", include_str!("../../recipes/gpt2-lora.toml")),
    (
        "smollm2-lora",
        include_str!("../../recipes/smollm2-lora.toml"),
    ),
    (
        "qwen2.5-lora",
        include_str!("../../recipes/qwen2.5-lora.toml"),
    ),
    ("chat", include_str!("../../recipes/chat.toml")),
    (
        "smollm2-chat",
        include_str!("../../recipes/smollm2-chat.toml"),
    ),
];

/// The demo's conversations (`corpus/gen_symbiotic.py --chat`), which
/// `symb init` writes for a recipe that reads them.
const CHAT_CORPUS: [(&str, &str); 2] = [
    ("chat.jsonl", include_str!("../../corpus/chat.jsonl")),
    (
        "chat_eval.jsonl",
        include_str!("../../corpus/chat_eval.jsonl"),
    ),
];

/// `symb --version`: the crate's version and the commit it was built from.
pub const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SYMB_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(name = "symb", version = LONG_VERSION, about = "From a corpus of a new language to a \
    language model running in a web browser")]
pub struct Cli {
    /// The manifest (default: `symb.toml` in this folder or the nearest one above it).
    #[arg(short = 'm', long = "manifest", global = true, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// More output (-v: reasons, cache hits and artifact hashes; -vv: debug logs). RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Print only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Colour: auto (on a terminal, unless NO_COLOR is set), always or never.
    #[arg(long, global = true, value_name = "WHEN", default_value = "auto")]
    pub color: ColorChoice,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the output folder: only stages whose inputs changed run.
    Build {
        /// Build only this stage (or dtype) and what it needs; the output folder is left as it is.
        #[arg(long = "target", value_name = "T")]
        targets: Vec<String>,
        /// Run independent stages on N threads (default: the number of cores).
        #[arg(short, long, value_name = "N")]
        jobs: Option<usize>,
        /// Re-run this stage even if it is cached.
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// One JSON object per line on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show each stage as fresh or stale, and why.
    Status {
        #[arg(long)]
        json: bool,
        /// Exit with 1 when a stage is stale (for CI), 0 when all are fresh.
        #[arg(long)]
        exit_code: bool,
    },
    /// Print the stage graph (a tree by default).
    Graph {
        /// Graphviz DOT.
        #[arg(long, conflicts_with = "mermaid")]
        dot: bool,
        /// A Mermaid flowchart.
        #[arg(long)]
        mermaid: bool,
    },
    /// Start a project from a recipe: DIR/symb.toml (DIR made if missing,
    /// as `cargo new` does), DIR/corpus/ and DIR/.gitignore.
    Init {
        /// The recipe to start from.
        #[arg(long, default_value = "symbiotic", value_parser = clap::builder::PossibleValuesParser::new(RECIPES.map(|(name, _)| name)))]
        recipe: String,
        /// The project's folder (default: this one); the project is named
        /// after it. A path ending in `.toml` names the manifest itself.
        #[arg(value_name = "DIR")]
        path: Option<PathBuf>,
        /// Print only errors.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove the output folder (if symb made it) and the cache's contents.
    /// On a terminal it asks first when that removes a trained model.
    Clean {
        /// Remove without asking.
        #[arg(short, long)]
        yes: bool,
    },
    /// Remove cache entries the current manifest's plan does not use.
    Gc {
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check a folder against what transformers.js needs to load it (file
    /// names per dtype, config.json, tokenizer files, graph inputs and outputs).
    Lint {
        /// The folder (an output folder, or any model folder for the web).
        #[arg(default_value = "dist")]
        folder: PathBuf,
        /// Print `{"folder", "ok", "findings": [{"file", "message"}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Serve an output folder and its playground page on 127.0.0.1, with the
    /// COOP/COEP headers multithreaded WebAssembly needs.
    Serve {
        #[arg(default_value = "dist")]
        folder: PathBuf,
        /// The port (0: any free one).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// A `node_modules` folder with @huggingface/transformers and
        /// onnxruntime-web: the page loads them from this server (offline)
        /// instead of the URL in `[web] transformers_js`.
        #[arg(long, value_name = "NODE_MODULES")]
        transformers_js: Option<PathBuf>,
    },
    /// Generation from a model folder (greedy, or sampled with `--temperature`),
    /// to try a model from the terminal.
    Generate {
        /// A Hugging Face model folder (config.json, model.safetensors,
        /// tokenizer.json); default: the output folder of the project
        /// here (the nearest `symb.toml`).
        #[arg(long, value_name = "PATH")]
        model: Option<PathBuf>,
        /// The text to continue; give it several times to decode the prompts
        /// as one left-padded batch (one line, or one JSON object, each).
        #[arg(long, required_unless_present = "chat", conflicts_with = "chat")]
        prompt: Vec<String>,
        /// Talk to a chat model: the messages (`--system`, `--user`, or
        /// `--messages`) rendered with the folder's chat template, the reply
        /// decoded to its end of turn.
        #[arg(long)]
        chat: bool,
        /// With `--chat`: the system message.
        #[arg(long, requires = "chat", value_name = "TEXT")]
        system: Option<String>,
        /// With `--chat`: the user's message.
        #[arg(
            long,
            requires = "chat",
            value_name = "TEXT",
            conflicts_with = "messages"
        )]
        user: Option<String>,
        /// With `--chat`: a JSON file of the conversation so far, a list of
        /// `{"role", "content"}` messages (or `{"messages": [...]}`).
        #[arg(long, requires = "chat", value_name = "FILE")]
        messages: Option<PathBuf>,
        #[arg(long, default_value_t = 32, value_name = "N")]
        max_new_tokens: usize,
        /// `candle` runs the model folder itself; `onnx` runs an output folder's ONNX file.
        #[arg(long, default_value = "candle", value_parser = ["candle", "onnx"])]
        backend: String,
        /// The ONNX file's dtype (with `--backend onnx`): fp32, fp16, q8, int8, uint8, q4 or q4f16.
        #[arg(long, value_name = "D", value_parser = |s: &str| s.parse::<Dtype>().map_err(|e| e.to_string()))]
        dtype: Option<Dtype>,
        /// A PEFT LoRA adapter folder to apply (with `--backend candle`).
        #[arg(long, value_name = "PATH")]
        adapter: Option<PathBuf>,
        /// Sample with this temperature instead of taking the likeliest token (0: greedy).
        #[arg(long, default_value_t = 0.0, value_name = "T")]
        temperature: f64,
        /// Sample among the K likeliest tokens only (0: all).
        #[arg(long, default_value_t = 0, value_name = "K")]
        top_k: usize,
        /// The sampling seed: one seed, one text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print `{"input_ids", "generated_ids", "text", "logits"}`.
        #[arg(long)]
        json: bool,
    },
    /// Cache maintenance.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Run one stage that a build sent to a remote engine (the entrypoint of
    /// a Ray job): its description and inputs come from the store, with this
    /// machine's credentials; its record goes back there.
    #[command(hide = true)]
    Worker {
        /// The shared store (`s3://bucket/prefix`).
        #[arg(long)]
        store: String,
        /// The description blob, `DIGEST:SIZE`.
        #[arg(long)]
        job: String,
        /// The worker's own cache (default: `$SYMB_WORKER_CACHE`, else
        /// `symb-worker` in the temporary folder), kept across jobs so that
        /// a retried job resumes from its checkpoints.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
    /// Print a completion script for a shell, e.g. `symb completions bash > ~/.local/share/bash-completion/completions/symb`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Re-hash every blob, action record and output file against what symb
    /// wrote, and report what differs.
    Verify {
        /// Also remove the corrupt cache entries (their stages re-run at the next build).
        #[arg(long)]
        repair: bool,
    },
    /// Upload to the cache remote everything the current plan has built
    /// (`[cache] remote` or `SYMB_CACHE_REMOTE`), even when builds are read
    /// only. `symb gc` stays local.
    Push {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command; returns the process exit code.
pub fn run(cli: Cli) -> Exit {
    render::set_color(cli.color);
    init_logging(cli.verbose);
    let mode = if cli.quiet {
        Mode::Quiet
    } else if cli.verbose > 0 {
        Mode::Verbose
    } else {
        Mode::Human
    };
    let needs_manifest = matches!(
        cli.command,
        Command::Build { .. }
            | Command::Status { .. }
            | Command::Graph { .. }
            | Command::Clean { .. }
            | Command::Gc { .. }
            | Command::Cache { .. }
    );
    let manifest = if needs_manifest {
        match find_manifest(cli.manifest.as_deref()) {
            Ok(path) => path,
            Err(message) => {
                eprintln!("{}", render::diagnostic(&message));
                return Exit::BadInput;
            }
        }
    } else {
        cli.manifest.clone().unwrap_or_default()
    };
    match cli.command {
        Command::Completions { shell } => {
            // Written whole, so a closed pipe (`| head`) is no panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "symb", &mut script);
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &script);
            Exit::Success
        }
        Command::Build {
            targets,
            jobs,
            force,
            json,
        } => build(
            &manifest,
            &targets,
            jobs,
            force,
            if json { Mode::Json } else { mode },
        ),
        Command::Status { json, exit_code } => match status(&manifest, json) {
            Ok(fresh) => {
                if exit_code && !fresh {
                    Exit::Failed
                } else {
                    Exit::Success
                }
            }
            Err(e) => report::<()>(Err(e), json),
        },
        Command::Graph { dot, mermaid } => report(
            Project::open(&manifest, &[]).map(|p| {
                let text = if dot {
                    p.plan.to_dot()
                } else if mermaid {
                    p.plan.to_mermaid()
                } else {
                    p.plan.to_tree()
                };
                out(text.trim_end());
            }),
            false,
        ),
        Command::Init {
            recipe,
            path,
            quiet,
        } => init(&recipe, path.as_deref(), quiet),
        Command::Clean { yes } => report(
            Project::open(&manifest, &[])
                .and_then(
                    |p| match yes || !removes_training(&p) || confirm_clean(&p) {
                        true => p.clean().map(Some),
                        false => Ok(None),
                    },
                )
                .map(|clean| {
                    let Some(clean) = clean else {
                        eprintln!("Nothing removed.");
                        return;
                    };
                    for path in clean.removed {
                        eprintln!("     Removed {}", path.display());
                    }
                    for path in clean.kept {
                        eprintln!("        Kept {path} (not written by symb)");
                    }
                }),
            false,
        ),
        Command::Gc { dry_run } => report(
            Project::open(&manifest, &[])
                .and_then(|p| p.gc(&Project::default_options(1), dry_run))
                .map(|r| {
                    let verb = if dry_run { "Would remove" } else { "Removed" };
                    // A dry run lists each thing; a real one with -v.
                    if dry_run || mode == Mode::Verbose {
                        for entry in &r.removed {
                            eprintln!(
                                "{}",
                                render::status(
                                    verb,
                                    render::Tone::Note,
                                    &format!("{} ({})", entry.what, render::bytes(entry.bytes))
                                )
                            );
                        }
                    }
                    if mode != Mode::Quiet {
                        eprintln!(
                            "{}",
                            render::status(
                                verb,
                                render::Tone::Good,
                                &format!(
                                    "{} action records, {} blobs and {} abandoned checkpoints ({})",
                                    r.actions_removed,
                                    r.blobs_removed,
                                    r.checkpoints_removed,
                                    render::bytes(r.bytes_freed)
                                )
                            )
                        );
                    }
                }),
            false,
        ),
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            user,
            messages,
            max_new_tokens,
            backend,
            dtype,
            adapter,
            temperature,
            top_k,
            seed,
            json,
        } => {
            if !(temperature >= 0.0 && temperature.is_finite()) {
                eprintln!(
                    "error: `--temperature` must be 0 (greedy) or positive, not {temperature}"
                );
                return Exit::BadInput;
            }
            let model = match model.map_or_else(project_output, Ok) {
                Ok(model) => model,
                Err(message) => {
                    eprintln!("{message}");
                    return Exit::BadInput;
                }
            };
            let sampling = (temperature > 0.0).then_some(crate::model::Sampling {
                temperature,
                top_k,
                seed,
            });
            let (prompt, special) = if chat {
                match chat_prompt(&model, system, user, messages.as_deref()) {
                    Ok(rendered) => (vec![rendered], false),
                    Err(message) => {
                        eprintln!("error: {message}");
                        return Exit::BadInput;
                    }
                }
            } else {
                (prompt, true)
            };
            generate(
                &model,
                &prompt,
                special,
                max_new_tokens,
                &backend,
                dtype,
                adapter.as_deref(),
                sampling.as_ref(),
                json,
            )
        }
        Command::Lint { folder, json } => lint(&folder, json),
        Command::Worker { store, job, cache } => worker(&store, &job, cache),
        Command::Serve {
            folder,
            port,
            transformers_js,
        } => serve(&folder, port, transformers_js.as_deref()),
        Command::Cache {
            command: CacheCommand::Push { json },
        } => match push(&manifest, json) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{e}");
                Exit::from(e.class())
            }
        },
        Command::Cache {
            command: CacheCommand::Verify { repair },
        } => match Project::open(&manifest, &[]).and_then(|p| {
            let label = p.manifest.project.output_label.clone();
            p.verify(repair).map(|r| (label, r))
        }) {
            Ok((output, (cache, folder))) => {
                let action = if cache.repaired { " (removed)" } else { "" };
                for line in &cache.corrupt {
                    eprintln!("     Corrupt {line}{action}");
                }
                for line in &cache.missing {
                    eprintln!("     Missing {line}");
                }
                for path in &folder.changed {
                    eprintln!(
                        "     Changed `{output}/{path}` differs from what symb wrote; the next build rewrites it"
                    );
                }
                for path in &folder.missing {
                    eprintln!("     Missing `{output}/{path}`; the next build writes it again");
                }
                for path in &folder.foreign {
                    eprintln!(
                        "        Kept `{output}/{path}` (not written by symb; builds carry it along)"
                    );
                }
                eprintln!(
                    "    Verified {} blobs, {} action records and {} output files: {} corrupt, {} \
                        missing, {} changed in `{output}`",
                    cache.blobs,
                    cache.actions,
                    folder.checked,
                    cache.corrupt.len(),
                    cache.missing.len() + folder.missing.len(),
                    folder.changed.len(),
                );
                if !cache.corrupt.is_empty() && !cache.repaired {
                    eprintln!(
                        "        Note `symb cache verify --repair` removes the corrupt entries; \
                            the stages that made them re-run at the next build"
                    );
                }
                let clean = cache.corrupt.is_empty()
                    && cache.missing.is_empty()
                    && folder.changed.is_empty()
                    && folder.missing.is_empty();
                if clean { Exit::Success } else { Exit::Failed }
            }
            Err(e) => report::<()>(Err(e), false),
        },
    }
}

/// Writes a line to stdout; a closed pipe (`symb build --json | head`) is
/// not an error worth a panic.
pub(crate) fn out(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// The manifest: the one given, else `symb.toml` here or in the nearest
/// folder above (as cargo finds Cargo.toml), as a path relative to here.
fn find_manifest(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let here = std::env::current_dir()
        .map_err(|e| format!("error: cannot read the current folder: {e}"))?;
    let mut relative = PathBuf::new();
    for folder in here.ancestors() {
        if folder.join("symb.toml").is_file() {
            return Ok(relative.join("symb.toml"));
        }
        relative.push("..");
    }
    Err(format!(
        "error: no `symb.toml` in `{}` or any folder above it\n  help: write one with `symb init` \
            (or `symb init --recipe NAME`: {}), or name a manifest with `-m FILE`, e.g. `symb \
            build -m symb.toml.example`",
        here.display(),
        RECIPES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The output folder of the project here (`symb generate` without `--model`).
fn project_output() -> Result<PathBuf, String> {
    let manifest = find_manifest(None)
        .map_err(|e| format!("{e}\n  help: or name a model folder with `--model PATH`"))?;
    let resolved = crate::manifest::load(&manifest).map_err(|e| e.to_string())?;
    let output = resolved.project.output;
    if !output.join("config.json").is_file() {
        return Err(format!(
            "error: `{}` (the output folder of `{}`) holds no model yet\n  help: run `symb build` \
            first, or name a model folder with `--model PATH`",
            output.display(),
            manifest.display()
        ));
    }
    Ok(output)
}

/// Whether `symb clean` would remove a trained model: the plan trains one
/// and the output folder or the cache exists.
fn removes_training(project: &Project) -> bool {
    project.plan.stage("finetune").is_some()
        && (project.manifest.project.output.exists() || project.cache.bucket().exists())
}

/// On a terminal, asks whether to remove the trained model; elsewhere (a
/// script, CI) the answer is yes, as `rm -r` gives it.
fn confirm_clean(project: &Project) -> bool {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return true;
    }
    eprint!(
        "This removes `{}` and the cache, with the trained model: training it again takes as \
        long as it took. Remove them? [y/N] ",
        project.manifest.project.output_label
    );
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

fn report<T>(result: Result<T, ProjectError>, json: bool) -> Exit {
    match result {
        Ok(_) => Exit::Success,
        Err(e) => {
            eprintln!("{}", render::diagnostic(&e.to_string()));
            if json {
                out(
                    serde_json::json!({"event": "error", "message": e.to_string(), "exit_code": Exit::from(e.class()).code()}),
                );
            }
            Exit::from(e.class())
        }
    }
}

/// Runs `handler` with the signal's number on the first SIGINT, SIGTERM or
/// SIGHUP (on a thread of its own, so it may take locks and print).
fn on_signal(handler: impl FnOnce(i32) + Send + 'static) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    handler(signal);
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle signals: {e}"),
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 | 1 => "warn",
        _ => "symb=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(render::color())
        .with_target(false)
        .try_init();
}

fn build(
    manifest: &Path,
    targets: &[String],
    jobs: Option<usize>,
    force: Vec<String>,
    mode: Mode,
) -> Exit {
    let json = mode == Mode::Json;
    let project = match Project::open(manifest, targets) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", render::diagnostic(&e.to_string()));
            if json {
                out(
                    serde_json::json!({"event": "build", "status": "failed", "error": e.to_string(), "exit_code": Exit::from(e.class()).code()}),
                );
            }
            return Exit::from(e.class());
        }
    };
    let mut forced = Vec::new();
    for stage in force {
        match project.stages_named(&stage) {
            Ok(names) => forced.extend(names),
            Err(e) => {
                eprintln!(
                    "{}",
                    render::diagnostic(&format!(
                        "error: `--force {stage}`: {}",
                        e.to_string().trim_start_matches("error: ")
                    ))
                );
                return Exit::BadInput;
            }
        }
    }
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut options = BuildOptions {
        force: forced.into_iter().collect(),
        ..Project::default_options(jobs)
    };
    let reporter: &'static CliReporter = Box::leak(Box::new(CliReporter::new(mode)));
    let (remote, warning) = project.remote();
    if let Some(message) = warning {
        crate::engine::Reporter::event(
            reporter,
            crate::engine::Event::RemoteWarning { message: &message },
        );
    }
    let ray = match project.dispatch(remote.as_ref()) {
        Ok((dispatch, warning)) => {
            if let Some(message) = warning {
                crate::engine::Reporter::event(
                    reporter,
                    crate::engine::Event::RemoteWarning { message: &message },
                );
            }
            dispatch
        }
        Err(e) => {
            eprintln!("{}", render::diagnostic(&e.to_string()));
            if json {
                out(
                    serde_json::json!({"event": "build", "status": "failed", "error": e.to_string(), "exit_code": Exit::from(e.class()).code()}),
                );
            }
            return Exit::from(e.class());
        }
    };
    options.remote = remote;
    options.dispatch = ray
        .clone()
        .map(|(ray, fallback_local)| crate::engine::Dispatch {
            executor: ray,
            fallback_local,
        });
    // Ctrl-C, SIGTERM (CI cancelling, `timeout`, `docker stop`) and SIGHUP
    // alike: say what stopped and that the next build resumes; the cache
    // holds only whole results (written to a temporary name, then renamed),
    // so stopping at any point loses nothing already finished. Remote jobs
    // this build waits on are stopped too (a killed build leaves them to
    // run, and the next build attaches to them). The exit code is 128 plus
    // the signal's number, as a shell reports it.
    on_signal(move |signal| {
        reporter.interrupted();
        if let Some((ray, _)) = &ray {
            for (job, result) in ray.stop_in_flight() {
                match result {
                    Ok(true) => eprintln!("{}", render::stopped_job(&job, ray.address())),
                    Ok(false) => {}
                    Err(e) => eprintln!(
                        "warning: cannot stop Ray job {job}: {e}; it runs on, and the next build attaches to it"
                    ),
                }
            }
        }
        std::process::exit(Exit::Signal(signal).code());
    });
    match project.build(&options, reporter) {
        Ok(report) => {
            reporter.finish(&project, &report);
            Exit::of(report.outcome.failure())
        }
        Err(e) => {
            reporter.clear();
            eprintln!("{}", render::diagnostic(&e.to_string()));
            if json {
                out(
                    serde_json::json!({"event": "build", "status": "failed", "error": e.to_string(), "exit_code": Exit::from(e.class()).code()}),
                );
            }
            Exit::from(e.class())
        }
    }
}

/// `symb worker`: runs one described stage, printing JSON lines for the
/// build that waits on it (progress, then `done` or `error`).
fn worker(store: &str, job: &str, cache: Option<PathBuf>) -> Exit {
    use crate::ray::WorkerLine;
    /// Progress at most once a second (the build reads the whole log each
    /// time), and the last step; finite figures only (JSON has no NaN).
    struct Lines(std::sync::Mutex<Option<std::time::Instant>>);
    impl crate::engine::Reporter for Lines {
        fn event(&self, event: crate::engine::Event<'_>) {
            let line = match event {
                crate::engine::Event::StageProgress {
                    done,
                    total,
                    message,
                    fields,
                    ..
                } => {
                    let mut last = self.0.lock().expect("progress lock");
                    if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
                        && done < total
                    {
                        return;
                    }
                    *last = Some(std::time::Instant::now());
                    WorkerLine::Progress {
                        done,
                        total,
                        message: message.to_string(),
                        fields: fields
                            .iter()
                            .filter(|(_, v)| v.is_finite())
                            .map(|(k, v)| (k.to_string(), *v))
                            .collect(),
                    }
                }
                crate::engine::Event::StageNote { message, .. } => WorkerLine::Note {
                    message: message.to_string(),
                },
                _ => return,
            };
            out(serde_json::to_string(&line).expect("worker lines serialise"));
        }
    }
    let fail = |error: crate::engine::StageError| {
        let code = Exit::from(error.class);
        out(serde_json::to_string(&WorkerLine::Error {
            class: error.class,
            message: error.message,
        })
        .expect("worker lines serialise"));
        code
    };
    let started = std::time::Instant::now();
    let result = (|| {
        let failed = |m: String| crate::engine::StageError::failed(m);
        let blob = job
            .split_once(':')
            .and_then(|(digest, size)| {
                Some(crate::cache::BlobRef {
                    digest: digest.to_string(),
                    size: size.parse().ok()?,
                })
            })
            .ok_or_else(|| failed(format!("`--job {job}` is not DIGEST:SIZE")))?;
        let store = crate::cache::S3Store::open(store)
            .map_err(|e| failed(format!("the worker cannot open the store: {e}")))?;
        let dir = cache
            .or_else(|| std::env::var_os("SYMB_WORKER_CACHE").map(PathBuf::from))
            .unwrap_or_else(|| std::env::temp_dir().join("symb-worker"));
        let cache = crate::cache::Cache::open(&dir)?;
        let description = crate::engine::fetch_description(&cache, &store, &blob)?;
        let stage = crate::stages::StageKind::rebuild(&description.kind, &description.spec)
            .map_err(|e| failed(format!("the job's `{}` stage: {e}", description.stage)))?;
        let tools = Project::default_options(1).tools;
        crate::engine::run_described(
            &cache,
            &store,
            &description,
            stage.as_ref(),
            &tools,
            &Lines(Default::default()),
        )
    })();
    match result {
        Ok(record) => {
            out(serde_json::to_string(&WorkerLine::Done {
                key: record.key,
                seconds: started.elapsed().as_secs_f64(),
            })
            .expect("worker lines serialise"));
            Exit::Success
        }
        Err(error) => fail(error),
    }
}

/// Prints each stage's state; returns whether all are fresh.
fn status(manifest: &Path, json: bool) -> Result<bool, ProjectError> {
    let project = Project::open(manifest, &[])?;
    let states = project.status(&Project::default_options(1))?;
    let drift = project.output_drift(&states);
    // Which stale stages the cache remote would serve (those whose key is
    // known: their upstream stages are fresh).
    let (remote, warning) = project.remote();
    if let Some(message) = warning {
        eprintln!("warning: {message}");
    }
    // A stale stage the remote has is fetched by the next build; a fresh
    // one it lacks (a build killed before it uploaded, a remote that was
    // down) is uploaded by the next build with a writable remote.
    let served: Vec<bool> = states
        .iter()
        .map(|s| match (&remote, &s.key) {
            (Some(remote), Some(key)) => remote.store.has_record(key).unwrap_or(false),
            _ => false,
        })
        .collect();
    if json {
        let stages: Vec<serde_json::Value> = states
            .iter()
            .zip(&served)
            .map(|(s, &on_remote)| {
                let mut value = serde_json::to_value(s).expect("states serialise");
                if remote.is_some() {
                    value["remote"] = on_remote.into();
                    value["local_only"] = (s.fresh && !on_remote).into();
                }
                value
            })
            .collect();
        let mut line = serde_json::json!({"stages": stages, "fresh": states.iter().all(|s| s.fresh) && drift.as_ref().is_none_or(|d| d.is_current())});
        if let Some(drift) = &drift {
            line["output"] = serde_json::to_value(drift).expect("drift serialises");
            line["output"]["path"] = project.manifest.project.output_label.clone().into();
            line["output"]["current"] = drift.is_current().into();
        }
        out(line);
    } else {
        for (state, &on_remote) in states.iter().zip(&served) {
            if state.fresh && remote.is_some() && !on_remote {
                let next = if remote.as_ref().is_some_and(|r| r.write) {
                    "the next build uploads it"
                } else {
                    "the remote is read-only here: `symb cache push` uploads it"
                };
                out(format!(
                    "{:>12} {} (local only: the cache remote lacks it; {next})",
                    "Fresh", state.stage
                ));
            } else if state.fresh {
                out(format!("{:>12} {}", "Fresh", state.stage));
            } else if on_remote {
                out(format!(
                    "{:>12} {}: {} (the cache remote has it: the next build fetches it)",
                    "Stale", state.stage, state.reason
                ));
            } else {
                out(format!("{:>12} {}: {}", "Stale", state.stage, state.reason));
            }
        }
        if let Some(drift) = drift.as_ref().filter(|d| !d.is_current()) {
            let output = &project.manifest.project.output_label;
            let list = |files: &[String]| {
                files
                    .iter()
                    .take(5)
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if files.len() > 5 { ", ..." } else { "" }
            };
            let mut why = Vec::new();
            if drift.absent {
                why.push("it is not there".to_string());
            } else {
                if !drift.missing.is_empty() {
                    why.push(format!("{} missing", list(&drift.missing)));
                }
                if !drift.differ.is_empty() {
                    why.push(format!(
                        "{} not as built (edited, or left by another build)",
                        list(&drift.differ)
                    ));
                }
                if !drift.extra.is_empty() {
                    why.push(format!("{} no longer built", list(&drift.extra)));
                }
            }
            out(format!(
                "{:>12} output `{output}`: {}; `symb build` writes it anew",
                "Stale",
                why.join("; ")
            ));
        }
    }
    Ok(states.iter().all(|s| s.fresh) && drift.as_ref().is_none_or(|d| d.is_current()))
}

/// `symb cache push`: every built stage of the plan, to the remote.
fn push(manifest: &Path, json: bool) -> Result<Exit, ProjectError> {
    let project = Project::open(manifest, &[])?;
    let (remote, warning) = project.remote();
    let Some(remote) = remote else {
        eprintln!(
            "error: {}",
            warning.unwrap_or_else(|| {
                "no cache remote: set `[cache] remote` in the manifest or SYMB_CACHE_REMOTE"
                    .to_string()
            })
        );
        return Ok(Exit::BadInput);
    };
    let states = project.status(&Project::default_options(1))?;
    let (mut pushed, mut bytes, mut corrupt, mut replaced) =
        (Vec::new(), 0u64, Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    let records: Vec<_> = states
        .iter()
        .filter(|s| s.fresh)
        .filter_map(|state| {
            state
                .key
                .as_deref()
                .and_then(|key| project.cache.lookup(key))
        })
        .collect();
    for (record, result) in records.iter().zip(crate::engine::upload_all(
        &project.cache,
        remote.store.as_ref(),
        &records,
    )) {
        match result.as_ref().map_err(|e| &**e) {
            Ok(sent) => {
                bytes += sent.bytes;
                replaced.extend(
                    sent.replaced
                        .iter()
                        .map(|digest| format!("{}: {digest}", record.stage)),
                );
                pushed.push(record.stage.clone());
            }
            // A local blob whose bytes are not its digest's is not sent (and
            // is removed: the next build rebuilds it); the others go on.
            Err(crate::engine::UploadError::Local(e)) => {
                eprintln!(
                    "error: `{}` is not pushed: {e} (removed; `symb build` rebuilds it)",
                    record.stage
                );
                corrupt.push(record.stage.clone());
            }
            Err(e) => {
                eprintln!(
                    "error: cannot push `{}` to the cache remote: {e}",
                    record.stage
                );
                return Ok(Exit::Failed);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 {
        bytes as f64 / 1e6 / seconds
    } else {
        0.0
    };
    let unbuilt: Vec<&str> = states
        .iter()
        .filter(|s| !s.fresh)
        .map(|s| s.stage.as_str())
        .collect();
    if json {
        out(
            serde_json::json!({"pushed": pushed, "bytes": bytes, "seconds": seconds, "mb_per_second": rate, "replaced": replaced, "corrupt": corrupt, "not_built": unbuilt, "remote": remote.store.describe()}),
        );
    } else {
        out(format!(
            "{:>12} {} stages to {} ({} uploaded at {rate:.1} MB/s, the rest were there)",
            "Pushed",
            pushed.len(),
            remote.store.describe(),
            render::bytes(bytes)
        ));
        for blob in &replaced {
            out(format!(
                "{:>12} {blob} (the remote held other bytes under its name)",
                "Replaced"
            ));
        }
        if !unbuilt.is_empty() {
            out(format!(
                "{:>12} {} (not built: run `symb build` first)",
                "Skipped",
                unbuilt.join(", ")
            ));
        }
    }
    Ok(if corrupt.is_empty() {
        Exit::Success
    } else {
        Exit::Failed
    })
}

#[allow(clippy::too_many_arguments)]
fn generate(
    model: &Path,
    prompts: &[String],
    special: bool,
    max_new_tokens: usize,
    backend: &str,
    dtype: Option<Dtype>,
    adapter: Option<&Path>,
    sampling: Option<&crate::model::Sampling>,
    json: bool,
) -> Exit {
    if backend == "onnx" || dtype.is_some() {
        if backend != "onnx" {
            eprintln!("error: `--dtype` picks an ONNX file: add `--backend onnx`");
            return Exit::BadInput;
        }
        if adapter.is_some() {
            eprintln!(
                "error: `--adapter` applies to `--backend candle`; an output folder's ONNX files \
                    have the adapter merged in"
            );
            return Exit::BadInput;
        }
        let generations: Result<Vec<_>, _> = prompts
            .iter()
            .map(|prompt| {
                crate::verify::generate(
                    model,
                    dtype.unwrap_or(Dtype::Fp32),
                    prompt,
                    max_new_tokens,
                    sampling,
                    special,
                )
            })
            .collect();
        return match generations {
            Ok(generations) => print_generations(prompts, &generations, json),
            Err(e) => {
                eprintln!("error: {e}");
                match e {
                    crate::verify::VerifyError::Model(
                        crate::model::ModelError::Config(_) | crate::model::ModelError::Io { .. },
                    ) => Exit::BadInput,
                    _ => Exit::Failed,
                }
            }
        };
    }
    match crate::model::generate(model, adapter, prompts, max_new_tokens, sampling, special) {
        Ok(generations) => print_generations(prompts, &generations, json),
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                crate::model::ModelError::Candle(_)
                | crate::model::ModelError::Write { .. }
                | crate::model::ModelError::Network(_) => Exit::Failed,
                _ => Exit::BadInput,
            }
        }
    }
}

/// `generate --chat`'s prompt: the messages rendered with the folder's chat
/// template, with the generation prompt.
fn chat_prompt(
    model: &Path,
    system: Option<String>,
    user: Option<String>,
    file: Option<&Path>,
) -> Result<String, String> {
    use crate::chat::Message;
    let (template, render) = crate::chat::folder_template(model)
        .map_err(|e| format!("`{}`: {e}", model.display()))?
        .ok_or_else(|| {
            format!(
                "`{}` has no chat template (tokenizer_config.json's `chat_template`, or \
                chat_template.jinja): `--chat` talks to a chat model; use `--prompt` to continue \
                text",
                model.display()
            )
        })?;
    let mut messages: Vec<Message> = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", &system));
    }
    match (user, file) {
        (Some(user), _) => messages.push(Message::new("user", &user)),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read `{}`: {e}", file.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("`{}`: invalid JSON: {e}", file.display()))?;
            let list = value.get("messages").unwrap_or(&value).clone();
            let read: Vec<Message> = serde_json::from_value(list).map_err(|e| {
                format!(
                    "`{}`: not a list of {{\"role\", \"content\"}} messages: {e}",
                    file.display()
                )
            })?;
            if let Some(bad) = read
                .iter()
                .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
            {
                return Err(format!(
                    "`{}`: role `{}` is not one of system, user, assistant",
                    file.display(),
                    bad.role
                ));
            }
            if !messages.is_empty() && read.iter().any(|m| m.role == "system") {
                return Err(format!(
                    "`{}` has a system message, and `--system` gives another",
                    file.display()
                ));
            }
            messages.extend(read);
        }
        (None, None) => {
            return Err(
                "`--chat` needs the user's message: `--user TEXT` or `--messages FILE`".into(),
            );
        }
    }
    template
        .render(&messages, &render)
        .map_err(|e| format!("`{}`: {e}", model.display()))
}

fn serve(folder: &Path, port: u16, modules: Option<&Path>) -> Exit {
    if !folder.join("index.html").is_file() {
        eprintln!(
            "error: `{}` has no index.html: serve an output folder that `symb build` made with an `[export]` section",
            folder.display()
        );
        return Exit::BadInput;
    }
    let server = match crate::serve::Server::bind(folder, port, modules) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "error: cannot serve `{}` on 127.0.0.1:{port}: {e}",
                folder.display()
            );
            return Exit::BadInput;
        }
    };
    // The URL goes to stdout (scripts read it); the rest to stderr.
    out(server.url());
    let source = if modules.is_some() {
        "this server (offline)"
    } else if folder.join("web/transformers.min.js").is_file() {
        "the folder's web/ (offline)"
    } else {
        "the URL in `[web] transformers_js`"
    };
    eprintln!(
        "     Serving `{}` at {} (transformers.js from {source}); Ctrl-C stops",
        folder.display(),
        server.url()
    );
    match server.run() {
        Ok(()) => Exit::Success,
        Err(e) => {
            eprintln!("error: {e}");
            Exit::Failed
        }
    }
}

fn lint(folder: &Path, json: bool) -> Exit {
    if !folder.is_dir() {
        eprintln!("error: `{}` is not a folder", folder.display());
        return Exit::BadInput;
    }
    let findings = crate::lint::lint(folder);
    if json {
        out(serde_json::json!({"folder": folder, "ok": findings.is_empty(), "findings": findings}));
    }
    for finding in &findings {
        eprintln!("error: {}/{finding}", folder.display());
    }
    if findings.is_empty() {
        eprintln!(
            "     Checked `{}`: transformers.js can load it",
            folder.display()
        );
        Exit::Success
    } else {
        eprintln!(
            "error: `{}` has {} problem(s) for transformers.js",
            folder.display(),
            findings.len()
        );
        Exit::Failed
    }
}

fn print_generations(
    prompts: &[String],
    generations: &[crate::model::Generation],
    json: bool,
) -> Exit {
    for (prompt, generation) in prompts.iter().zip(generations) {
        if json {
            out(serde_json::to_string(generation).expect("generation serialises"));
        } else {
            out(format!("{prompt}{}", generation.text));
        }
    }
    Exit::Success
}

/// The recipe's manifest with its `[project] name` set to `name`.
fn named(text: &str, name: &str) -> String {
    let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
    let mut done = false;
    let mut out: String = text
        .lines()
        .map(|line| {
            if !done && line.starts_with("name = \"") {
                done = true;
                let comment = line.find(" #").map_or("", |i| &line[i..]);
                format!("name = \"{escaped}\"{comment}")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn init(recipe: &str, path: Option<&Path>, quiet: bool) -> Exit {
    // DIR/symb.toml; a `.toml` path is the manifest itself (its folder the project's).
    let path = match path {
        None => PathBuf::from("symb.toml"),
        Some(p) if p.extension().is_some_and(|e| e == "toml") => p.to_path_buf(),
        Some(dir) => dir.join("symb.toml"),
    };
    let path = path.as_path();
    let Some((_, text)) = RECIPES.iter().find(|(name, _)| *name == recipe) else {
        let names: Vec<&str> = RECIPES.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "error: unknown recipe `{recipe}`; available: {}",
            names.join(", ")
        );
        return Exit::BadInput;
    };
    if path.exists() {
        eprintln!(
            "error: `{}` already exists; symb init does not overwrite a manifest",
            path.display()
        );
        return Exit::BadInput;
    }
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let written = (|| -> std::io::Result<Vec<String>> {
        std::fs::create_dir_all(folder)?;
        // The project is named after its folder, as `cargo new` names a package.
        let name = std::path::absolute(folder)
            .ok()
            .and_then(|f| {
                f.components()
                    .next_back()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
            })
            .filter(|n| !n.is_empty() && n != "/");
        let text = name.map_or_else(|| text.to_string(), |n| named(text, &n));
        std::fs::write(path, &text)?;
        let mut written = vec![format!("`{}` from the `{recipe}` recipe", path.display())];
        // The corpus folder the recipes read, with a note on what goes there.
        let corpus = folder.join("corpus");
        if !corpus.exists() {
            std::fs::create_dir_all(&corpus)?;
            std::fs::write(corpus.join("README.md"), CORPUS_NOTE)?;
            written.push(format!("`{}` (put your text here)", corpus.display()));
        }
        // A chat recipe starts with the demo's conversations, so that it
        // builds as it is.
        if text.contains("corpus/chat.jsonl") {
            for (name, conversations) in CHAT_CORPUS {
                let file = corpus.join(name);
                if !file.exists() {
                    std::fs::write(&file, conversations)?;
                    written.push(format!("`{}` (the demo's conversations)", file.display()));
                }
            }
        }
        // Built things stay out of version control: append what is missing.
        let ignore = folder.join(".gitignore");
        let existing = match std::fs::read_to_string(&ignore) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("`{}`: {e}; it was left as it is", ignore.display()),
                ));
            }
        };
        let missing: Vec<&str> = ["/dist/", "/cache/"]
            .into_iter()
            .filter(|line| {
                !existing
                    .lines()
                    .any(|l| l.trim().trim_matches('/') == line.trim_matches('/'))
            })
            .collect();
        if !missing.is_empty() {
            let separator = if existing.is_empty() || existing.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            std::fs::write(
                &ignore,
                format!(
                    "{existing}{separator}# symb's output folder and cache (rebuilt by `symb build`)\n{}\n",
                    missing.join("\n")
                ),
            )?;
            written.push(format!("`{}` ({})", ignore.display(), missing.join(", ")));
        }
        Ok(written)
    })();
    match written {
        Ok(_) if quiet => Exit::Success,
        Ok(written) => {
            for line in written {
                eprintln!("{}", render::status("Created", render::Tone::Good, &line));
            }
            let next = if text.contains("corpus/chat.jsonl") {
                "run `symb build`; then replace `corpus/chat.jsonl` with your conversations \
                (one `{\"messages\": [...]}` a line)"
            } else {
                "put your corpus in `corpus/*.txt` (one document per line), then run `symb build`"
            };
            let next = if folder == Path::new(".") {
                next.to_string()
            } else {
                format!("`cd {}`, then {next}", folder.display())
            };
            eprintln!("{}", render::status("Next", render::Tone::Note, &next));
            Exit::Success
        }
        Err(e) => {
            eprintln!("error: cannot write `{}`: {e}", path.display());
            Exit::Failed
        }
    }
}

/// `corpus/README.md` as `symb init` writes it.
const CORPUS_NOTE: &str = "# The corpus\n\n\
Text of the language the model is to learn, as `symb.toml`'s `[corpus] files`\n\
reads it (`corpus/*.txt` in the recipes):\n\n\
- `.txt`: one document per line;\n\
- `.jsonl`: one JSON object per line, with a `text` field, or `prompt` and `completion`\n\
  (other names: `[corpus] text_field`, `prompt_field`, `completion_field`);\n\
- `.csv`: a header row naming the columns, as for `.jsonl`;\n\
- conversations (`[corpus] format = \"chat\"`): `.jsonl`, one `{\"messages\": [{\"role\":\n\
  \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", ...}]}` a line.\n\n\
A part of it (`eval_fraction`, 5% by default) is held out to measure the model\n\
and to give the playground its example prompts. A few megabytes are enough to\n\
start: `python3 corpus/gen_symbiotic.py` in symb's repository writes one in a\n\
constructed language.\n";
