//! A project: one manifest, its plan and its cache. The operations the
//! commands run (build, status, gc, clean) live here, between the CLI and the
//! engine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::cache::{BlobRef, Cache, CacheError, GcReport, StatCache};
use crate::engine::{
    self, BuildOptions, BuildOutcome, FailureClass, Plan, PlanError, Reporter, StageState,
};
use crate::manifest::{self, Manifest, ManifestError};
use crate::stages;

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("error: {0}")]
    Plan(#[from] PlanError),
    #[error("error: {0}")]
    NotATarget(String),
    #[error("error: {0}")]
    Cache(#[from] CacheError),
    /// The lint refused the new output folder.
    #[error(
        "error: the new output folder fails the transformers.js lint, so `{output}` was left as it was:\n{findings}"
    )]
    Lint { output: String, findings: String },
    /// The output path is not symb's to write (checked again at the swap).
    #[error("error: `project.output` = \"{output}\": {message}")]
    Output {
        output: String,
        message: String,
        unreadable: bool,
    },
}

impl ProjectError {
    /// Whose fault it is: the input's (a bad manifest, target or output
    /// path) or the machine's.
    pub fn class(&self) -> FailureClass {
        match self {
            ProjectError::Manifest(_) | ProjectError::Plan(_) | ProjectError::NotATarget(_) => {
                FailureClass::BadInput
            }
            // The output path is the manifest's choice, unless it could not be read.
            ProjectError::Output { unreadable, .. } => {
                if *unreadable {
                    FailureClass::Failed
                } else {
                    FailureClass::BadInput
                }
            }
            ProjectError::Cache(_) | ProjectError::Lint { .. } => FailureClass::Failed,
        }
    }
}

pub struct Project {
    pub manifest: Manifest,
    /// Its Hub base's commit, resolved once before planning.
    hub: Option<stages::HubCommit>,
    pub plan: Plan,
    pub cache: Cache,
    /// Identifies this project's refs in a (possibly shared) cache.
    id: String,
    /// True when the plan was cut down to `--target`s.
    partial: bool,
}

/// What a build did.
#[derive(Debug)]
pub struct BuildReport {
    pub outcome: BuildOutcome,
    /// Whether the output folder was rewritten (`None` when not assembled:
    /// a failed or partial build leaves it as it was).
    pub output_updated: Option<bool>,
    /// Files in the output folder that symb did not write, carried into the
    /// new one.
    pub kept: Vec<String>,
    pub seconds: f64,
}

impl Project {
    /// Loads the manifest and plans the build (restricted to `targets`).
    pub fn open(manifest_path: &Path, targets: &[String]) -> Result<Self, ProjectError> {
        let manifest = manifest::load(manifest_path)?;
        let hub = stages::resolve_hub(&manifest);
        let plan = stages::plan(&manifest, hub.as_ref())?;
        for target in targets {
            plan.resolve(target)
                .map_err(|e| not_a_target(&manifest, target, e))?;
        }
        let plan = plan.restrict(targets)?;
        let cache = Cache::open(&manifest.project.cache)?;
        let id = blake3::hash(
            manifest
                .path
                .canonicalize()
                .unwrap_or_else(|_| manifest.path.clone())
                .as_os_str()
                .as_encoded_bytes(),
        )
        .to_hex()[..16]
            .to_string();
        Ok(Project {
            manifest,
            hub,
            plan,
            cache,
            id,
            partial: !targets.is_empty(),
        })
    }

    /// The stages `--force NAME` means: as `--target NAME` does, in the
    /// whole plan; with `--target`, those of them this build runs.
    pub fn stages_named(&self, name: &str) -> Result<Vec<String>, ProjectError> {
        let full = stages::plan(&self.manifest, self.hub.as_ref())?;
        let named = full
            .resolve(name)
            .map_err(|e| not_a_target(&self.manifest, name, e))?;
        let built: Vec<String> = named
            .iter()
            .filter(|n| self.plan.stage(n).is_some())
            .map(|n| n.to_string())
            .collect();
        if built.is_empty() {
            return Err(ProjectError::NotATarget(format!(
                "`{name}` ({}) is not part of this build: `--target` leaves it out",
                named.join(", ")
            )));
        }
        Ok(built)
    }

    /// Options for a build on `jobs` threads; `SYMB_CACHE_SALT` (if set)
    /// is mixed into every key, to invalidate a whole cache at once.
    pub fn default_options(jobs: usize) -> BuildOptions {
        BuildOptions {
            jobs,
            tools: [("symb".to_string(), crate::VERSION.to_string())].into(),
            salt: std::env::var("SYMB_CACHE_SALT").unwrap_or_default(),
            ..BuildOptions::default()
        }
    }

    /// The shared store: `SYMB_CACHE_REMOTE` (which wins) or `[cache]
    /// remote`; `SYMB_CACHE_REMOTE_WRITE=0` (or `remote_write = false`)
    /// makes it read-only. A remote that cannot be opened is a warning
    /// (returned with `None`): the build goes on locally.
    pub fn remote(&self) -> (Option<engine::Remote>, Option<String>) {
        let from_env = std::env::var("SYMB_CACHE_REMOTE")
            .ok()
            .filter(|v| !v.is_empty());
        let configured = self.manifest.cache_remote.as_ref();
        let Some(url) = from_env
            .clone()
            .or_else(|| configured.map(|c| c.url.clone()))
        else {
            return (None, None);
        };
        let mut write = configured.is_none_or(|c| c.write);
        if let Ok(value) = std::env::var("SYMB_CACHE_REMOTE_WRITE") {
            write = !matches!(value.trim(), "0" | "false" | "no" | "off");
        }
        match crate::cache::S3Store::open(&url) {
            Ok(store) => (
                Some(engine::Remote {
                    store: std::sync::Arc::new(store),
                    write,
                }),
                None,
            ),
            Err(e) => (
                None,
                Some(format!(
                    "the cache remote is not used: {e}; the build goes on locally"
                )),
            ),
        }
    }

    /// The executor for `[remote]` stages, with whether it falls back to a
    /// local run; `None` without `[remote]`. The address is
    /// `SYMB_REMOTE_ADDRESS` (which wins) or `remote.address`; the stages'
    /// inputs and outputs go through the cache remote, which must be set and
    /// writable (unless `fallback = "local"`, which then runs them here).
    #[allow(clippy::type_complexity)]
    pub fn dispatch(
        &self,
        remote: Option<&engine::Remote>,
    ) -> Result<
        (
            Option<(std::sync::Arc<crate::ray::RayExecutor>, bool)>,
            Option<String>,
        ),
        ProjectError,
    > {
        let Some(config) = &self.manifest.remote else {
            return Ok((None, None));
        };
        let error = |message: String| {
            ProjectError::Manifest(crate::manifest::ManifestError::general(
                &self.manifest.display,
                message,
            ))
        };
        let from_env = std::env::var("SYMB_REMOTE_ADDRESS")
            .ok()
            .filter(|v| !v.is_empty());
        let Some(address) = from_env.or_else(|| config.address.clone()) else {
            return Err(error(
                "`[remote]` has no `address`: set `remote.address` (Ray's dashboard, \
                such as \"http://head:8265\") or SYMB_REMOTE_ADDRESS"
                    .to_string(),
            ));
        };
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(error(format!(
                "SYMB_REMOTE_ADDRESS = \"{address}\" is not an http:// or https:// URL"
            )));
        }
        if crate::manifest::has_user_info(&address) {
            return Err(error(
                "SYMB_REMOTE_ADDRESS holds a user name or password: symb prints the \
                address in its messages, so give Ray's address without them"
                    .to_string(),
            ));
        }
        let store = match remote {
            Some(remote) if remote.write => remote.store.describe(),
            _ if config.fallback_local => {
                return Ok((
                    None,
                    Some(
                        "`[remote]` stages run here (`fallback = \"local\"`): they \
                    need a writable cache remote, and this build has none"
                            .to_string(),
                    ),
                ));
            }
            Some(_) => {
                return Err(error(
                    "`[remote]` stages read their inputs from the cache remote and write their \
                        results there, but it is read-only (`remote_write = false` or \
                        SYMB_CACHE_REMOTE_WRITE=0)"
                        .to_string(),
                ));
            }
            None if self.manifest.cache_remote.is_some()
                || std::env::var("SYMB_CACHE_REMOTE").is_ok_and(|v| !v.is_empty()) =>
            {
                return Err(error(
                    "`[remote]` stages need the cache remote, which cannot be opened \
                    (see the warning above)"
                        .to_string(),
                ));
            }
            None => {
                return Err(error(
                    "`[remote]` stages send their inputs and get their results through the shared \
                        cache: set `[cache] remote` (or SYMB_CACHE_REMOTE) to an s3:// URL the \
                        workers can read too"
                        .to_string(),
                ));
            }
        };
        let stages = config
            .stages
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    config.resources.get(s).cloned().unwrap_or_default(),
                )
            })
            .collect();
        let ray = crate::ray::RayExecutor::new(&address, &store, &config.worker_symb, stages);
        Ok((
            Some((std::sync::Arc::new(ray), config.fallback_local)),
            None,
        ))
    }

    /// Runs the build: stages, then the output folder (only when every stage
    /// succeeded and the whole plan was built).
    pub fn build(
        &self,
        options: &BuildOptions,
        reporter: &dyn Reporter,
    ) -> Result<BuildReport, ProjectError> {
        let started = Instant::now();
        let lock = self
            .cache
            .lock(|| reporter.event(engine::Event::WaitingForLock))?;
        // A cache this process cannot write serves a build that runs
        // nothing; a stage that must run fails on its first write.
        if !lock.read_only() {
            self.cache.clear_tmp()?;
        }
        self.remove_stale_staging();
        let stat_path = self.cache.stat_cache_path();
        let stat = Mutex::new(StatCache::load(&stat_path));
        let mut outcome =
            engine::execute(&self.plan, &self.cache, &stat, &self.id, options, reporter)?;
        let mut output_updated = None;
        let mut kept = Vec::new();
        if outcome.failure().is_none() && !self.partial {
            let output = &self.manifest.project.output;
            let mut files = self.published(&outcome);
            let current = engine::output_is_current(&self.cache, &self.id, output, &files);
            if !current {
                // The blobs about to be copied are checked: a corrupt one is
                // removed and its stage runs again (once; a second failure is
                // an error). Files the output already holds are linked.
                let reusable = engine::reusable_outputs(&self.cache, &self.id, output, &files);
                if let Some(error) = files
                    .iter()
                    .filter(|(path, _)| !reusable.contains(*path))
                    .find_map(|(_, blob)| self.cache.check_blob(blob).err())
                {
                    reporter.event(engine::Event::CorruptBlob {
                        message: &format!("{error}; rebuilding"),
                    });
                    outcome = engine::execute(
                        &self.plan,
                        &self.cache,
                        &stat,
                        &self.id,
                        options,
                        reporter,
                    )?;
                    files = self.published(&outcome);
                }
                if outcome.failure().is_none() {
                    // A folder meant for transformers.js is linted before it
                    // replaces the previous one.
                    let web = self.plan.stage("bundle").is_some();
                    let check = |dir: &Path| -> Result<(), String> {
                        let findings = if web {
                            crate::lint::lint(dir)
                        } else {
                            Vec::new()
                        };
                        if findings.is_empty() {
                            Ok(())
                        } else {
                            Err(findings
                                .iter()
                                .map(|f| format!("  {f}"))
                                .collect::<Vec<_>>()
                                .join("\n"))
                        }
                    };
                    let label = || self.manifest.project.output_label.clone();
                    let assembled =
                        engine::assemble_output(&self.cache, &self.id, output, &files, &check)
                            .map_err(|e| match e {
                                engine::AssembleError::Cache(e) => ProjectError::Cache(e),
                                engine::AssembleError::Rejected(findings) => ProjectError::Lint {
                                    output: label(),
                                    findings,
                                },
                                e @ (engine::AssembleError::Refused(_)
                                | engine::AssembleError::Collision { .. }) => {
                                    let unreadable = matches!(
                                        e,
                                        engine::AssembleError::Refused(
                                            engine::OutputRefusal::Unreadable { .. }
                                        )
                                    );
                                    ProjectError::Output {
                                        output: label(),
                                        message: e.to_string(),
                                        unreadable,
                                    }
                                }
                            })?;
                    kept = assembled.kept;
                }
            }
            output_updated = outcome.failure().is_none().then_some(!current);
        }
        if !lock.read_only() {
            stat.into_inner()
                .expect("stat cache lock")
                .save(&stat_path, &self.cache.tmp_dir())?;
        }
        Ok(BuildReport {
            outcome,
            output_updated,
            kept,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Output path -> blob, for every artifact the plan publishes.
    fn published(&self, outcome: &BuildOutcome) -> BTreeMap<String, BlobRef> {
        let mut files = BTreeMap::new();
        for stage in self.plan.stages() {
            let Some(record) = outcome.get(stage.name()).and_then(|o| o.record.as_ref()) else {
                continue;
            };
            for (artifact, path) in stage.publishes() {
                if let Some(blob) = record.outputs.get(&artifact) {
                    files.insert(path, blob.clone());
                }
            }
        }
        files
    }

    /// Staging folders left beside the output by a killed build.
    fn remove_stale_staging(&self) {
        let output = &self.manifest.project.output;
        let (Some(parent), Some(name)) =
            (output.parent(), output.file_name().and_then(|n| n.to_str()))
        else {
            return;
        };
        let prefix = format!(".{name}.symb-new-");
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        let entries: Vec<_> = entries.flatten().collect();
        // A build that died between moving the old output aside and putting
        // the new one in left the old one here: it comes back first.
        if !output.exists()
            && let Some(old) = entries.iter().find(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".old"))
            })
        {
            let _ = std::fs::rename(old.path(), output);
        }
        for entry in entries {
            if !entry.path().exists() {
                continue;
            }
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Each stage fresh or stale, with the reason; runs nothing.
    pub fn status(&self, options: &BuildOptions) -> Result<Vec<StageState>, ProjectError> {
        let stat = Mutex::new(StatCache::load(&self.cache.stat_cache_path()));
        Ok(engine::status(
            &self.plan,
            &self.cache,
            &stat,
            &self.id,
            options,
        )?)
    }

    /// How the output folder differs from what this build would write
    /// there: `None` when that is not known (a stage is stale, or the plan
    /// is cut down to `--target`s) or the plan writes no output.
    pub fn output_drift(&self, states: &[StageState]) -> Option<engine::OutputDrift> {
        if self.partial || !states.iter().all(|s| s.fresh) {
            return None;
        }
        let mut files = BTreeMap::new();
        for (stage, state) in self.plan.stages().zip(states) {
            let record = state
                .key
                .as_deref()
                .and_then(|key| self.cache.lookup(key))?;
            for (artifact, path) in stage.publishes() {
                if let Some(blob) = record.outputs.get(&artifact) {
                    files.insert(path, blob.clone());
                }
            }
        }
        if files.is_empty() {
            return None;
        }
        Some(engine::output_drift(
            &self.cache,
            &self.id,
            &self.manifest.project.output,
            &files,
        ))
    }

    /// Removes cache entries the current plan does not reference.
    pub fn gc(&self, options: &BuildOptions, dry_run: bool) -> Result<GcReport, ProjectError> {
        let _lock = self.cache.lock(|| {})?;
        let keep: BTreeSet<String> = self
            .status(options)?
            .into_iter()
            .filter_map(|s| s.key)
            .collect();
        Ok(self.cache.gc(&keep, dry_run)?)
    }

    /// Removes the output folder (only if symb made it: it holds symb's
    /// marker) and what the cache stores (its versioned bucket; the cache
    /// folder itself stays, with anything else the user keeps there).
    /// Returns what was removed, and the user's files in the output, which
    /// keep it from being removed whole: only symb's own files go then.
    pub fn clean(&self) -> Result<Clean, ProjectError> {
        let _lock = self.cache.lock(|| {})?;
        let output = &self.manifest.project.output;
        let refused = |e: engine::OutputRefusal| self.output_error(e);
        let mut clean = Clean::default();
        if let engine::OutputFolder::Owned(owned) =
            engine::inspect_output(output).map_err(refused)?
        {
            clean.kept = engine::foreign_files(output, &owned);
            // Only symb's files go; a folder left holding the user's files
            // keeps a marker that lists none, so the next build takes it.
            if engine::remove_owned(output, owned.keys().map(String::as_str))?.is_empty() {
                std::fs::remove_dir(output).map_err(|e| CacheError::io(output, e))?;
            } else {
                engine::mark_empty(output)?;
            }
            clean.removed.push(output.clone());
        }
        let bucket = self.cache.bucket();
        if bucket.exists() {
            std::fs::remove_dir_all(&bucket).map_err(|e| CacheError::io(&bucket, e))?;
            clean.removed.push(bucket);
        }
        Ok(clean)
    }

    fn output_error(&self, refusal: engine::OutputRefusal) -> ProjectError {
        let unreadable = matches!(refusal, engine::OutputRefusal::Unreadable { .. });
        ProjectError::Output {
            output: self.manifest.project.output_label.clone(),
            message: refusal.to_string(),
            unreadable,
        }
    }

    /// Re-hashes the cache and the output folder against what symb wrote.
    /// With `repair`, corrupt cache entries are removed (their stages re-run
    /// at the next build); without, only reported.
    pub fn verify(
        &self,
        repair: bool,
    ) -> Result<(crate::cache::VerifyReport, engine::OutputCheck), ProjectError> {
        let _lock = self.cache.lock(|| {})?;
        let cache = self.cache.verify(repair)?;
        let refused = |e: engine::OutputRefusal| self.output_error(e);
        let output = engine::check_output(&self.manifest.project.output).map_err(refused)?;
        Ok((cache, output))
    }
}

/// What `symb clean` did.
#[derive(Debug, Default)]
pub struct Clean {
    pub removed: Vec<PathBuf>,
    /// The user's files in the output folder, left where they are.
    pub kept: Vec<String>,
}

/// A name that is no stage: when it is a dtype the manifest does not build,
/// say so and where to add it.
fn not_a_target(manifest: &manifest::Manifest, name: &str, error: PlanError) -> ProjectError {
    match name.parse::<crate::dtype::Dtype>() {
        Ok(dtype) if manifest.export.is_some() => ProjectError::NotATarget(format!(
            "`{dtype}` is not built by this manifest: add it to `export.targets` in {} (it has: {})",
            manifest.path.display(),
            manifest
                .export
                .as_ref()
                .map(|e| e
                    .targets
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        )),
        Ok(dtype) => ProjectError::NotATarget(format!(
            "`{dtype}` is an ONNX dtype, and this manifest has no `[export]` section; add one with \
                `targets = [\"{dtype}\"]`"
        )),
        Err(_) => error.into(),
    }
}
