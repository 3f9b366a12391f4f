//! Stage `browser` (`[verify.browser]`): every ONNX file run again where it
//! will run, by transformers.js in a headless Chromium, on WebGPU (and
//! WebAssembly if asked), and compared with candle's reference on the first
//! prompts, under the same bounds as `verify.<dtype>`. Chromium is started
//! by symb on a page that symb serves on 127.0.0.1; the page posts what it
//! measured back to that server. A dtype that needs the adapter's
//! `shader-f16` where it has none (fp16, q4f16 on SwiftShader) is recorded
//! as unproven on that device, not failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::shared::{
    Artifact, EVAL, ModelStage, REFERENCE_LOGITS, WEB_FOLDER, WORKLOAD, data_inputs, io,
    link_or_copy, on_path, tokenized_lines, tokenizer_differences, write_json, writers,
};
use crate::dtype::Dtype;
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::{Adapter, Browser, Device, TransformersJs, Verify};
use crate::verify::{self, Tolerance, transformers_js};

/// The page Chromium opens (served beside the model's files).
const CHECK_PAGE: &str = include_str!("../web/check.html");

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BrowserStage {
    pub browser: Browser,
    /// Each file's bounds, as its `verify.<dtype>` has them.
    pub tolerance: BTreeMap<Dtype, Tolerance>,
    /// The check page's digest: editing the page checks again.
    pub page: String,
    /// The files it checks: their producers' artifacts are keyed by digest.
    #[serde(rename = "@dtypes")]
    pub dtypes: Vec<Dtype>,
    /// The stage whose config and tokenizer the folder has (`merge`,
    /// `vocab` or `base`): its artifacts are keyed by digest.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
    /// `web.transformers_js`, where the page gets the library without a
    /// local copy (bundled: the pinned files, served beside the page):
    /// keyed by the library's version (the stage's tools).
    #[serde(rename = "@transformers_js_url")]
    pub transformers_js_url: TransformersJs,
    /// Whether the build has a corpus, whose eval lines the page tokenizes:
    /// the eval split is an input, keyed by digest.
    #[serde(rename = "@corpus")]
    pub corpus: bool,
}

impl BrowserStage {
    pub fn new(
        browser: Browser,
        dtypes: Vec<Dtype>,
        verify: &Verify,
        model_stage: ModelStage,
        transformers_js_url: TransformersJs,
        corpus: bool,
    ) -> Self {
        let tolerance = dtypes
            .iter()
            .map(|&d| (d, verify::tolerance(d, verify.tolerance.get(&d))))
            .collect();
        BrowserStage {
            browser,
            tolerance,
            page: blake3::hash(CHECK_PAGE.as_bytes()).to_hex().to_string(),
            dtypes,
            model_stage,
            transformers_js_url,
            corpus,
        }
    }

    /// The Chromium to start: the setting, `$CHROMIUM`, or one on the PATH.
    fn chromium(&self) -> Result<PathBuf, StageError> {
        if let Some(path) = &self.browser.chromium {
            return Ok(path.clone());
        }
        if let Some(path) = std::env::var_os("CHROMIUM") {
            return Ok(PathBuf::from(path));
        }
        if let Some(found) = on_path(&[
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ]) {
            return Ok(found);
        }
        Err(StageError::bad_input(
            "`[verify.browser]` needs Chromium and none was found (chromium, chromium-browser, \
                google-chrome on the PATH): install it (`apt-get install chromium`), set \
                `CHROMIUM`, or set `verify.browser.chromium`",
        ))
    }

    /// What the result depends on besides the files: the browser's and the library's versions.
    fn identities(&self) -> BTreeMap<String, String> {
        let chromium = self
            .chromium()
            .ok()
            .and_then(|path| {
                Command::new(path)
                    .arg("--version")
                    .stderr(Stdio::null())
                    .output()
                    .ok()
            })
            .map_or("missing".to_string(), |out| {
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            });
        let library = match &self.browser.transformers_js {
            Some(modules) => std::fs::read(modules.join("@huggingface/transformers/package.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .and_then(|p| p["version"].as_str().map(str::to_string))
                .unwrap_or_else(|| "missing".to_string()),
            None => match &self.transformers_js_url {
                TransformersJs::Bundle => transformers_js::identity(),
                TransformersJs::Url(url) => url.clone(),
            },
        };
        [
            ("chromium".to_string(), chromium),
            ("transformers.js".to_string(), library),
        ]
        .into()
    }

    /// A folder transformers.js loads: the model's config and tokenizer,
    /// every ONNX file (with its data chunks), and the check page.
    fn site(
        &self,
        ctx: &StageContext<'_>,
        dir: &Path,
        job: &serde_json::Value,
    ) -> Result<(), StageError> {
        let io = |path: &Path, e: std::io::Error| {
            StageError::failed(format!("cannot write `{}`", path.display())).because(e)
        };
        let onnx = dir.join("onnx");
        std::fs::create_dir_all(&onnx).map_err(|e| io(&onnx, e))?;
        let mut external = serde_json::Map::new();
        for dtype in &self.dtypes {
            let model = Artifact::onnx(*dtype);
            let (file, data) = (model.file, data_inputs(ctx, model));
            if !data.is_empty() {
                external.insert(file.to_string(), data.len().into());
            }
            for (name, path) in std::iter::once((file.to_string(), model.path(ctx)?)).chain(data) {
                link_or_copy(path, &onnx.join(name))?;
            }
        }
        let mut config: serde_json::Value =
            crate::model::read_json(self.model_stage.file("config.json").path(ctx)?)
                .map_err(super::shared::model_error)?;
        config["transformers.js_config"] =
            serde_json::json!({ "use_external_data_format": external });
        write_json(&dir.join("config.json"), &config)?;
        let tokenizer = self.model_stage.file("tokenizer.json").path(ctx)?;
        link_or_copy(tokenizer, &dir.join("tokenizer.json"))?;
        let base = ctx
            .input(self.model_stage.name(), "tokenizer_config.json")
            .ok();
        write_json(
            &dir.join("tokenizer_config.json"),
            &super::shared::tokenizer_config(
                self.model_stage.file("config.json").path(ctx)?,
                tokenizer,
                base,
            )?,
        )?;
        if let Ok(generation) = self.model_stage.file("generation_config.json").path(ctx) {
            link_or_copy(generation, &dir.join("generation_config.json"))?;
        }
        write_json(&dir.join("check.json"), job)?;
        std::fs::write(dir.join("check.html"), CHECK_PAGE)
            .map_err(|e| io(&dir.join("check.html"), e))
    }
}

/// Chromium, killed (with its children: its process group) when dropped.
struct Chromium(Child);

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last lines of a log, for an error.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n    ")
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl BrowserStage {
    /// What it reads: the folder's config and tokenizer, the reference's
    /// answers, the eval split, and every file.
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = vec![
            self.model_stage.file("config.json"),
            self.model_stage.file("tokenizer.json"),
            WORKLOAD,
            REFERENCE_LOGITS,
        ];
        if self.corpus {
            inputs.push(EVAL);
        }
        inputs.extend(self.dtypes.iter().map(|&d| Artifact::onnx(d)));
        inputs
    }
}

impl Stage for BrowserStage {
    fn name(&self) -> &str {
        "browser"
    }
    fn kind(&self) -> &'static str {
        "browser"
    }
    fn version(&self) -> u32 {
        // 2: the folder it checks has `model_input_names` in
        // tokenizer_config.json. 3: the page tokenizes the eval lines. 4: the
        // stage is its settings (`browser.devices`, `tolerance.<dtype>`).
        4
    }
    fn settings(&self) -> Settings {
        settings_of(self)
    }
    fn spec(&self) -> Option<serde_json::Value> {
        spec_of(self)
    }
    fn dependencies(&self) -> Vec<String> {
        writers(&self.inputs())
    }
    fn tools(&self) -> BTreeMap<String, String> {
        self.identities()
    }
    fn publishes(&self) -> Vec<(String, String)> {
        vec![(
            "report.json".to_string(),
            "reports/browser.json".to_string(),
        )]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let chromium = self.chromium()?;
        let reference: verify::Reference =
            crate::model::read_json(WORKLOAD.path(ctx)?).map_err(super::shared::model_error)?;
        let count = self.browser.prompts.min(reference.greedy.len());
        let prompts: Vec<serde_json::Value> = (0..count)
            .map(|i| {
                let ids = &reference.workload.prompts[i].1;
                let greedy = &reference.greedy[i];
                let follow: Vec<u32> = ids
                    .iter()
                    .chain(&greedy[..greedy.len().saturating_sub(1)])
                    .copied()
                    .collect();
                serde_json::json!({ "ids": ids, "follow": follow, "new_tokens": greedy.len() })
            })
            .collect();
        let devices: Vec<&str> = self.browser.devices.iter().map(|d| d.name()).collect();
        let texts: Vec<String> = reference
            .workload
            .prompts
            .iter()
            .map(|(text, _)| text.clone())
            .collect();
        let lines = tokenized_lines(ctx, self.corpus, &texts)?;
        // Bundled and no local copy: the pinned files, served beside the page.
        let bundled = self.browser.transformers_js.is_none()
            && self.transformers_js_url == TransformersJs::Bundle;
        let job = serde_json::json!({
            "transformers_js": self.transformers_js_url.url(),
            "wasm": bundled.then_some(WEB_FOLDER),
            "devices": devices,
            "dtypes": self.dtypes,
            "prompts": prompts,
            "lines": lines,
        });
        let site = tempfile::Builder::new()
            .prefix("symb-browser-")
            .tempdir()
            .map_err(|e| StageError::failed("cannot create a temporary folder").because(e))?;
        self.site(ctx, site.path(), &job)?;
        if bundled {
            let library = transformers_js::library().map_err(|e| {
                StageError::failed("cannot provide transformers.js for the browser check")
                    .because(e)
            })?;
            let web = site.path().join(WEB_FOLDER);
            std::fs::create_dir_all(&web).map_err(|e| io(&web, e))?;
            for (name, path) in library.files() {
                link_or_copy(&path, &web.join(name))?;
            }
        }
        let (sender, inbox) = std::sync::mpsc::channel();
        let server =
            crate::serve::Server::bind(site.path(), 0, self.browser.transformers_js.as_deref())
                .map_err(|e| {
                    StageError::bad_input(
                        "cannot serve the browser check (`verify.browser.transformers_js`?)",
                    )
                    .because(e)
                })?
                .with_inbox(sender)
                .spawn();
        let profile = tempfile::Builder::new()
            .prefix("symb-chromium-")
            .tempdir()
            .map_err(|e| StageError::failed("cannot create a temporary folder").because(e))?;
        let log_path = profile.path().join("chromium.log");
        let log = std::fs::File::create(&log_path).map_err(|e| {
            StageError::failed(format!("cannot create `{}`", log_path.display())).because(e)
        })?;
        let mut command = Command::new(&chromium);
        // A fresh profile, nothing of the user's; no sandbox, as root has
        // none to give (the page is symb's own, from 127.0.0.1).
        command
            .arg("--headless")
            .arg("--no-sandbox")
            .arg(format!("--user-data-dir={}", profile.path().display()));
        command.args([
            "--no-first-run",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            "--enable-unsafe-webgpu",
        ]);
        match self.browser.adapter {
            Adapter::Swiftshader => command.args([
                "--use-webgpu-adapter=swiftshader",
                "--use-angle=swiftshader",
            ]),
            Adapter::Gpu => command.args(["--enable-features=Vulkan", "--ignore-gpu-blocklist"]),
        };
        command.arg(format!("{}check.html", server.url));
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(StageError::failed_from)?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let started = Instant::now();
        let mut browser = Chromium(command.spawn().map_err(|e| {
            StageError::bad_input(format!("cannot start `{}`", chromium.display())).because(e)
        })?);
        ctx.note(&format!(
            "checking {} files on {} in {}",
            self.dtypes.len(),
            self.browser
                .devices
                .iter()
                .map(|d| d.title())
                .collect::<Vec<_>>()
                .join(" and "),
            chromium.display()
        ));
        let mut posted: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let total = (self.dtypes.len() * devices.len()) as u64;
        loop {
            match inbox.recv_timeout(Duration::from_millis(500)) {
                Ok((name, _)) if name == "done" => break,
                Ok((name, body)) => {
                    if name.ends_with(".json") && name != "about.json" {
                        ctx.progress(
                            posted
                                .keys()
                                .filter(|k| k.ends_with(".json") && *k != "about.json")
                                .count() as u64
                                + 1,
                            total,
                            "files",
                        );
                    }
                    posted.insert(name, body);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    unreachable!("the server holds the sender")
                }
            }
            if let Ok(Some(status)) = browser.0.try_wait() {
                return Err(StageError::failed(format!(
                    "Chromium ({}) exited ({status}) before the check finished:\n    {}",
                    chromium.display(),
                    tail(&log_path, 12)
                )));
            }
            if started.elapsed() > self.browser.timeout {
                return Err(StageError::failed(format!(
                    "the browser check did not finish in {} s (`verify.browser.timeout_s`); \
                        Chromium's log ends:\n    {}",
                    self.browser.timeout.as_secs(),
                    tail(&log_path, 12)
                )));
            }
        }
        drop(browser);
        drop(server);
        let json = |name: &str| {
            posted
                .get(name)
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        };
        if let Some(failed) = json("failed.json") {
            return Err(StageError::bad_input(format!(
                "the browser check page could not run: {}",
                failed["error"].as_str().unwrap_or_default()
            )));
        }
        let about = json("about.json").unwrap_or_default();
        let shader_f16 = about["shader_f16"] == true;
        let logits_path = REFERENCE_LOGITS.path(ctx)?;
        let mut results = serde_json::Map::new();
        let tokenizer =
            tokenizers::Tokenizer::from_file(self.model_stage.file("tokenizer.json").path(ctx)?)
                .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
        let posted_tokens = json("tokens.json")
            .unwrap_or_else(|| serde_json::json!({ "error": "the page posted no token ids" }));
        let (_, mut problems) = tokenizer_differences(&tokenizer, &lines, &posted_tokens, 5)?;
        let mut speeds = Vec::new();
        for device in &self.browser.devices {
            let mut per_dtype = serde_json::Map::new();
            for dtype in &self.dtypes {
                let name = format!("{}.{dtype}", device.name());
                let run = json(&format!("{name}.json"))
                    .unwrap_or_else(|| serde_json::json!({ "error": "the page posted no result" }));
                let entry = if let Some(error) = run["error"].as_str() {
                    let needs_f16 = *device == Device::Webgpu
                        && !shader_f16
                        && (error.contains("does not support fp16")
                            || error.contains("requires f16"));
                    if needs_f16 {
                        serde_json::json!({ "status": "unproven", "reason": "needs shader-f16, \
                            which this adapter lacks", "error": error })
                    } else {
                        problems.push(format!("  {dtype} on {}: {error}", device.title()));
                        serde_json::json!({ "status": "failed", "error": error })
                    }
                } else {
                    let generated: Vec<Vec<u32>> = serde_json::from_value(run["generated"].clone())
                        .map_err(|e| {
                            StageError::failed(format!("{name}: the page's tokens")).because(e)
                        })?;
                    let logits: Vec<Vec<f32>> = (0..count)
                        .map(|i| {
                            posted
                                .get(&format!("{name}.{i}.f32"))
                                .map_or_else(Vec::new, |b| floats(b))
                        })
                        .collect();
                    let mut reader =
                        std::io::BufReader::new(std::fs::File::open(logits_path).map_err(|e| {
                            StageError::failed(format!("cannot open `{}`", logits_path.display()))
                                .because(e)
                        })?);
                    let report = verify::compare_browser(
                        &reference,
                        &mut reader,
                        &verify::BrowserRun { logits, generated },
                        &self.tolerance[dtype],
                    )
                    .map_err(|e| StageError::failed(name.to_string()).because(e))?;
                    for c in report.failures() {
                        let relation = if c.kind == "max" {
                            "above its maximum"
                        } else {
                            "below its minimum"
                        };
                        problems.push(format!(
                            "  {dtype} on {}: {} = {:.6} is {relation} {}",
                            device.title(),
                            c.metric,
                            c.value,
                            c.bound
                        ));
                    }
                    if let (Some(tokens), Some(seconds)) =
                        (run["tokens"].as_f64(), run["seconds"].as_f64())
                    {
                        speeds.push(format!("{dtype} {:.1}", tokens / seconds.max(1e-9)));
                    }
                    let status = if report.failures().next().is_some() {
                        "failed"
                    } else {
                        "passed"
                    };
                    let mut entry = serde_json::to_value(&report).expect("serialises");
                    entry["status"] = status.into();
                    entry
                };
                per_dtype.insert(dtype.name().to_string(), entry);
            }
            results.insert(device.name().to_string(), per_dtype.into());
            if !speeds.is_empty() {
                // Timings vary from run to run: said, not kept in the report (its bytes depend on the inputs only).
                ctx.note(&format!(
                    "tokens/s on {}: {}",
                    device.title(),
                    speeds.join(", ")
                ));
                speeds.clear();
            }
        }
        let report = serde_json::json!({
            "adapter": about["adapter"],
            "shader_f16": shader_f16,
            "prompts": count,
            "tokenized_lines": lines.len(),
            "devices": results,
        });
        if !problems.is_empty() {
            return Err(StageError::verification(format!(
                "the browser check failed (transformers.js in Chromium against candle, {} \
                    prompts):\n{}\n  (the output folder was not updated)",
                count,
                problems.join("\n")
            )));
        }
        write_json(&ctx.output("report.json"), &report)?;
        Ok(serde_json::json!({ "prompts": count }))
    }
}
