//! Stage `bundle`: what the output folder needs beyond the model's own
//! files: `config.json` with its `transformers.js_config` (the dtype a page
//! loads by default, which ONNX files keep their weights in external data and
//! in how many chunks) and `tokenizer_config.json`.

use std::collections::BTreeMap;

use super::shared::{
    ADAPTER_CONFIG, Artifact, BROWSER_REPORT, ModelStage, TRAINING_METRICS, VOCAB_REPORT, WARNINGS,
    WEB_FOLDER, WORKLOAD, data_inputs, writers,
};
use crate::dtype::Dtype;
use crate::engine::{Settings, Stage, StageContext, StageError, settings_of, spec_of};
use crate::manifest::{Device, TransformersJs};

/// The stage is its settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BundleStage {
    /// The stage whose model folder was exported: its artifacts are keyed
    /// by digest.
    #[serde(rename = "@model_stage")]
    pub model_stage: ModelStage,
    /// Every dtype target, in plan order.
    pub dtypes: Vec<Dtype>,
    /// The dtype transformers.js loads when a page names none.
    pub dtype: Dtype,
    /// The dtype a page loads on WebGPU.
    pub webgpu_dtype: Dtype,
    /// The devices the `browser` stage checked the files on, if it runs.
    pub browser: Option<Vec<crate::manifest::Device>>,
    /// The page's title (the project's name) and `[web]` defaults.
    pub title: String,
    pub web: crate::manifest::Web,
    /// Whether a `finetune` stage ran (its metrics and loss curve go in the report).
    pub finetune: bool,
    /// Whether a `tokenizer` stage ran (its warnings go in the report).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tokenizer: bool,
    /// Whether a `vocab` stage grew the base's vocabulary (its fertility goes in the report).
    pub vocab: bool,
    /// What the model card says beyond the reports.
    pub card: Card,
    /// The page template's digest: editing the template rebuilds the page.
    pub page_template: String,
}

/// The digest of the playground page's template.
pub fn page_template() -> String {
    blake3::hash(PAGE.as_bytes()).to_hex().to_string()
}

/// The model card's facts from the manifest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Card {
    pub license: Option<String>,
    pub language: Vec<String>,
    /// The Hub id of the base model, when it came from the Hub.
    pub base_model: Option<String>,
    /// How it was made, in a few words ("LoRA r 8 on a GPT-2 base").
    pub method: String,
    /// The corpus files, as the manifest names them.
    pub corpus: Vec<String>,
    /// What it says of a LoRA adapter (`None`: the build trains none).
    pub adapter: Option<AdapterCard>,
}

/// How the card puts a LoRA adapter back on its base with PEFT.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdapterCard {
    /// The arguments of transformers' `AutoModelForCausalLM.from_pretrained`
    /// that load the base as the manifest took it, and a comment on them;
    /// `None` where only symb has it (a scratch model's first weights).
    pub base: Option<(String, String)>,
    /// `export.adapter = "with-base"`: `adapter/base/` holds the base.
    pub with_base: bool,
}

const PAGE: &str = include_str!("../web/index.html");

/// An upstream JSON artifact, if the stage has it.
fn artifact_json(ctx: &StageContext<'_>, artifact: Artifact) -> Option<serde_json::Value> {
    artifact
        .path(ctx)
        .ok()
        .and_then(|p| crate::model::read_json(p).ok())
}

/// An ONNX file's size with its external data chunks.
fn file_bytes(ctx: &StageContext<'_>, onnx: Artifact) -> u64 {
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    onnx.path(ctx).map_or(0, size)
        + data_inputs(ctx, onnx)
            .iter()
            .map(|(_, p)| size(p))
            .sum::<u64>()
}

/// `template` with each `{{NAME}}` replaced by its value, in one pass (a
/// value that holds a `{{…}}` of its own is not replaced again).
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}").and_then(|end| {
            values
                .iter()
                .find(|(name, _)| *name == &after[..end])
                .map(|(_, v)| (end, v))
        }) {
            Some((end, value)) => {
                out.push_str(value);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A metric with `digits` decimals, or in scientific notation when that
/// would show only zeros (fp32's errors of a few millionths).
fn figure(value: f64, digits: usize) -> String {
    if value != 0.0 && value.abs() < 0.5 * 10f64.powi(-(digits as i32)) {
        format!("{value:.1e}")
    } else {
        format!("{value:.digits$}")
    }
}

/// A mixed search's candidates (`mixed` of a quantize report) as an SVG:
/// size across, KL on the calibration windows up (log scale), the bound
/// dashed, the chosen file filled.
fn candidates_svg(mixed: &serde_json::Value, bound: Option<f64>) -> String {
    use std::fmt::Write;
    let points: Vec<(f64, f64, bool)> = mixed["candidates"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| {
                    Some((
                        c["bytes"].as_f64()? / 1e6,
                        c["kl_divergence"].as_f64()?.max(1e-12),
                        c["eight_bit"] == mixed["chosen"],
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if points.is_empty() {
        return String::new();
    }
    let (w, h, pad) = (560.0, 240.0, 48.0);
    let calibration_bound = mixed["calibration_bounds"]["kl_divergence"].as_f64();
    let ys = points
        .iter()
        .map(|p| p.1.log10())
        .chain(bound.map(f64::log10))
        .chain(calibration_bound.map(f64::log10));
    let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let (x0, x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let sx = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-9) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y.log10() - y0) / (y1 - y0).max(1e-9) * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"candidate files: size and KL\" \
        font-size=\"13\"><text x=\"{pad}\" y=\"16\">KL on the calibration windows (log) against \
        MB</text><line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        h - pad,
        w - pad,
        h - pad
    );
    for (b, label) in [(bound, "bound"), (calibration_bound, "searched for")] {
        if let Some(b) = b {
            let y = sy(b);
            let _ = write!(
                svg,
                "<line x1=\"{pad}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#b00020\" \
                stroke-dasharray=\"4 3\"/><text x=\"{}\" y=\"{:.1}\" fill=\"#b00020\">{label} \
                {}</text>",
                w - pad,
                pad + 4.0,
                y - 4.0,
                figure(b, 6)
            );
        }
    }
    for (x, y, chosen) in &points {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"{}\" stroke=\"#0b57d0\"><title>{x:.2} \
            MB, KL {}</title></circle>",
            sx(*x),
            sy(*y),
            if *chosen { "#0b57d0" } else { "white" },
            figure(*y, 6)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{pad}\" y=\"{}\">{x0:.2} MB</text><text x=\"{}\" y=\"{}\" \
        text-anchor=\"end\">{x1:.2} MB</text></svg>",
        h - pad + 18.0,
        w - pad,
        h - pad + 18.0
    );
    svg
}

/// `; the weights of step N (the best eval loss)` when the run kept an
/// earlier step than its last.
fn kept_note(m: &serde_json::Value) -> String {
    match m["kept_step"].as_u64() {
        Some(kept) if m["steps"].as_u64().is_some_and(|s| s > kept) => {
            format!("; the weights of step {kept}, the best eval loss")
        }
        _ => String::new(),
    }
}

/// How many samples report.html shows.
const SAMPLES_SHOWN: usize = 6;

/// `Exact match 3/16 (19%), chrF 41.2 in fp32; …` over the prompts with a
/// reply, if any.
fn task_line(samples: &serde_json::Value) -> Option<String> {
    let task = samples.get("task")?;
    let dtype = samples["dtype"].as_str().unwrap_or_default();
    let n = task["prompts"].as_u64().unwrap_or(0);
    let side = |name: &str| {
        let exact = task[name]["exact_match"].as_f64().unwrap_or(0.0);
        format!(
            "exact match {}/{n} ({:.0}%), chrF {:.1} in {name}",
            (exact * n as f64).round(),
            exact * 100.0,
            task[name]["chrf"].as_f64().unwrap_or(0.0)
        )
    };
    let mut line = format!(
        "Greedy replies to the {n} eval prompts that have a reference reply: {}",
        side("fp32")
    );
    if dtype != "fp32" {
        line.push_str(&format!("; {}", side(dtype)));
    }
    line.push_str(" (chrF: character 1- to 6-gram F-score, β = 2, as sacreBLEU computes it).");
    Some(line)
}

/// report.html's samples: the first prompts' continuations, and the task
/// metrics.
fn samples_section(samples: &serde_json::Value) -> String {
    use std::fmt::Write;
    let rows: Vec<&serde_json::Value> = samples["samples"]
        .as_array()
        .into_iter()
        .flatten()
        .take(SAMPLES_SHOWN)
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let dtype = samples["dtype"].as_str().unwrap_or_default();
    let replies = rows.iter().any(|r| r["expected"].is_string());
    let mut html = String::from(
        "<h2>Samples</h2><p>What the model writes after the first eval prompts (greedy, as \
        verification decodes them): in fp32, and in the file the page loads.</p>",
    );
    if let Some(task) = task_line(samples) {
        let _ = write!(html, "<p>{}</p>", html_escape(&task));
    }
    let _ = write!(
        html,
        "<div class=\"scroll\"><table class=\"files samples\"><tr><th>prompt</th><th>fp32</th>{}{}</tr>",
        if dtype != "fp32" {
            format!("<th>{dtype}</th>")
        } else {
            String::new()
        },
        if replies { "<th>reference</th>" } else { "" }
    );
    for row in rows {
        let text = |k: &str| html_escape(row[k].as_str().unwrap_or_default());
        html.push_str("<tr>");
        html.push_str(&labelled_cell("prompt", &text("prompt")));
        html.push_str(&labelled_cell("fp32", &text("fp32")));
        if dtype != "fp32" {
            let own = if row[dtype] == row["fp32"] {
                "<span class=\"bound\">as fp32</span>".to_string()
            } else {
                text(dtype)
            };
            html.push_str(&labelled_cell(dtype, &own));
        }
        if replies {
            html.push_str(&labelled_cell("reference", &text("expected")));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></div>");
    html
}

/// A cell that names its column (`data-label`), shown beside the value
/// where a narrow screen lays each row out as a card.
fn labelled_cell(label: &str, content: &str) -> String {
    format!("<td data-label=\"{label}\"><span>{content}</span></td>")
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl BundleStage {
    /// Every dtype's ONNX file.
    fn files(&self) -> impl Iterator<Item = Artifact> + '_ {
        self.dtypes.iter().map(|&d| Artifact::onnx(d))
    }

    /// For each dtype, the earlier dtype whose file has the same bytes (q8
    /// and int8 are one file: transformers.js asks for each by its own name,
    /// so both names are written, as links to one file).
    fn twins(&self, ctx: &StageContext<'_>) -> Vec<Option<Dtype>> {
        let paths: Vec<Option<&std::path::Path>> =
            self.files().map(|onnx| onnx.path(ctx).ok()).collect();
        (0..paths.len())
            .map(|i| {
                paths[i].and_then(|p| {
                    (0..i)
                        .find(|&j| paths[j] == Some(p))
                        .map(|j| self.dtypes[j])
                })
            })
            .collect()
    }

    /// `report.html`: one self-contained page (no server needed) with the
    /// training curve and perplexity, each file's size and its verification.
    fn report(
        &self,
        ctx: &StageContext<'_>,
        samples: &serde_json::Value,
    ) -> Result<String, StageError> {
        use std::fmt::Write;
        let json = |artifact| artifact_json(ctx, artifact);
        let mut html = String::new();
        let title = html_escape(&self.title);
        let _ = write!(
            html,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} · symb \
                report</title><style>body{{font:15px/1.5 \
                system-ui,sans-serif;max-width:74rem;margin:2rem auto;padding:0 \
                1rem}}table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid \
                #ddd;padding:.3rem \
                .6rem;text-align:right}}th{{background:#f5f5f7}}td:first-child,th:first-child{{text-align:left}}.fail{{color:#b00020;font-weight:600}}.scroll{{overflow-x:auto}}svg{{max-width:100%;height:auto}}.bound{{color:#777;font-size:.8em;display:block}}table.samples \
                td,table.samples th{{text-align:left;max-width:24rem;overflow-wrap:anywhere}}@media \
                (max-width:40rem){{table.files,table.files tbody,table.files tr,table.files \
                td{{display:block}}table.files tr:first-child{{display:none}}table.files \
                tr{{border:1px solid #ddd;border-radius:6px;margin:.8rem 0;padding:.3rem \
                .6rem}}table.files td{{border:0;display:flex;justify-content:space-between;gap:1rem;padding:.2rem \
                0}}table.files td::before{{content:attr(data-label);font-weight:600;text-align:left}}table.files \
                td>span{{overflow-wrap:anywhere;min-width:0}}}}</style></head><body><h1>{title}</h1><p>Built by symb {} (no date or machine here: the same inputs give the same bytes).</p>",
            crate::VERSION
        );
        let warnings = self.warnings(ctx);
        if !warnings.is_empty() {
            html.push_str(
                "<h2>Warnings</h2><p>Every file below can pass its checks and the model still be \
                poor: these say why, and what to change.</p><ul class=\"warnings\">",
            );
            for (stage, w) in &warnings {
                let _ = write!(
                    html,
                    "<li><b>{}</b> ({stage}): {}<br><i>{}</i></li>",
                    html_escape(&w.code),
                    html_escape(&w.message),
                    html_escape(&w.help)
                );
            }
            html.push_str("</ul>");
        }
        if self.finetune {
            if let Some(m) = json(TRAINING_METRICS) {
                let number = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
                let _ = write!(
                    html,
                    "<h2>Training</h2><p>{} steps, {} tokens. Eval perplexity {:.1} before, {:.1} \
                        after (eval loss {:.3} → {:.3}){}{}.</p>",
                    m["steps"],
                    m["tokens"],
                    number("initial_perplexity"),
                    number("final_perplexity"),
                    number("initial_eval_loss"),
                    number("final_eval_loss"),
                    if m["stopped_early"] == true {
                        "; stopped early"
                    } else {
                        ""
                    },
                    kept_note(&m)
                );
            }
            if let Ok(svg) = ctx
                .input("finetune", "loss.svg")
                .and_then(|p| std::fs::read_to_string(p).map_err(StageError::failed_from))
            {
                html.push_str(&svg);
            }
        }
        if self.vocab
            && let Some(v) = json(VOCAB_REPORT)
        {
            let f = &v["fertility"];
            let per_word = |x: &serde_json::Value| {
                x["tokens_per_word"]
                    .as_f64()
                    .map_or(String::new(), |t| format!("{t:.2}"))
            };
            let _ = write!(
                html,
                "<h2>Vocabulary</h2><p><code>{}</code>: {} new tokens; the vocabulary grew from {} \
                    to {} rows. Tokens per word (fewer is better):</p><div \
                    class=\"scroll\"><table><tr><th>text</th><th>base \
                    tokenizer</th><th>after</th></tr><tr><td>eval \
                    split</td><td>{}</td><td>{}</td></tr><tr><td>English \
                    sample</td><td>{}</td><td>{}</td></tr></table></div><p>English lines without a \
                    new word that encode differently than before: {} of {}.</p>",
                v["strategy"].as_str().unwrap_or_default(),
                v["new_tokens"],
                v["base_vocab_size"],
                v["vocab_size"],
                per_word(&f["eval"]["base"]),
                per_word(&f["eval"]["extended"]),
                per_word(&f["english"]["base"]),
                per_word(&f["english"]["extended"]),
                f["english"]["of_those_encoded_differently"],
                f["english"]["lines_without_new_words"],
            );
        }
        html.push_str(&samples_section(samples));
        html.push_str(
            "<h2>ONNX files</h2><p>Each file run by ONNX Runtime and compared with the \
            model's forward pass in candle on the same prompts: one prefill pass, then candle's \
            greedy tokens fed through the KV cache (the first alone, then the rest together; one \
            at a time for q8, int8 and uint8, which scale their activations over each call); the \
            greedy match is the share of candle's greedy tokens that ONNX's own greedy decoding \
            gives before the two first differ.</p><div \
            class=\"scroll\"><table class=\"files\"><tr><th>dtype</th><th>file</th><th>MB</th><th>max abs \
            error</th><th>top-1 agreement</th><th>KL divergence</th><th>perplexity \
            ratio</th><th>greedy match</th><th>checks</th>",
        );
        // Each browser device: what the `browser` stage found, or that it did not run.
        let browser = if self.browser.is_some() {
            json(BROWSER_REPORT)
        } else {
            None
        };
        let devices = self.browser.clone().unwrap_or_else(|| vec![Device::Webgpu]);
        for device in &devices {
            let _ = write!(html, "<th>{}</th>", device.title());
        }
        html.push_str("</tr>");
        for ((onnx, dtype), twin) in self.files().zip(&self.dtypes).zip(self.twins(ctx)) {
            let (bytes, file) = (file_bytes(ctx, onnx), onnx.file);
            let report = json(Artifact::verify_report(*dtype)).unwrap_or_default();
            let m = &report["metrics"];
            let same = twin.map_or(String::new(), |t| {
                format!("<span class=\"bound\">the {t} file's bytes</span>")
            });
            let checks = report["checks"].as_array().cloned().unwrap_or_default();
            // Each metric with its bound under it (≤ a maximum, ≥ a minimum).
            let cell = |k: &str, digits: usize| {
                let value = m[k].as_f64().map_or("".to_string(), |v| figure(v, digits));
                match checks.iter().find(|c| c["metric"] == k) {
                    Some(c) => format!(
                        "{value}<span class=\"bound\">{} {}</span>",
                        if c["kind"] == "max" { "≤" } else { "≥" },
                        c["bound"]
                            .as_f64()
                            .map_or(String::new(), |b| format!("{b}"))
                    ),
                    None => value,
                }
            };
            let failed = checks.iter().filter(|c| c["passed"] != true).count();
            let verdict = if checks.is_empty() {
                "".to_string()
            } else if failed == 0 {
                format!("{} passed", checks.len())
            } else {
                format!("<span class=\"fail\">{failed} failed</span>")
            };
            html.push_str("<tr>");
            for (label, content) in [
                (
                    "dtype",
                    format!(
                        "{dtype}{}",
                        if *dtype == self.dtype {
                            " (default)"
                        } else {
                            ""
                        }
                    ),
                ),
                ("file", format!("onnx/{file}{same}")),
                ("MB", format!("{:.1}", bytes as f64 / 1e6)),
                ("max abs error", cell("max_abs_error", 4)),
                ("top-1 agreement", cell("top1_agreement", 4)),
                ("KL divergence", cell("kl_divergence", 6)),
                ("perplexity ratio", cell("perplexity_ratio", 4)),
                ("greedy match", cell("greedy_match", 3)),
                ("checks", verdict.clone()),
            ] {
                html.push_str(&labelled_cell(label, &content));
            }
            for device in &devices {
                let entry = browser
                    .as_ref()
                    .map(|b| &b["devices"][device.name()][dtype.name()]);
                let needs_f16 =
                    *device == Device::Webgpu && matches!(dtype, Dtype::Fp16 | Dtype::Q4f16);
                let text = match entry.map(|e| (e["status"].as_str().unwrap_or_default(), e)) {
                    Some(("passed", e)) => format!(
                        "passed<span class=\"bound\">top-1 {}, greedy {}</span>",
                        e["metrics"]["top1_agreement"]
                            .as_f64()
                            .map_or(String::new(), |v| figure(v, 4)),
                        e["metrics"]["greedy_match"]
                            .as_f64()
                            .map_or(String::new(), |v| figure(v, 3))
                    ),
                    Some(("unproven", _)) => "unproven<span class=\"bound\">needs shader-f16, \
                        which the adapter lacked</span>"
                        .to_string(),
                    Some((status, _)) if !status.is_empty() => format!(
                        "<span \
                        class=\"fail\">{}</span>",
                        html_escape(status)
                    ),
                    _ if needs_f16 => {
                        "not checked<span class=\"bound\">needs shader-f16</span>".to_string()
                    }
                    _ => "not checked".to_string(),
                };
                html.push_str(&labelled_cell(device.title(), &text));
            }
            html.push_str("</tr>");
        }
        let adapter = browser
            .as_ref()
            .map(|b| &b["adapter"])
            .filter(|a| a.is_object());
        let shader_f16 = if browser.as_ref().is_some_and(|b| b["shader_f16"] == true) {
            "with"
        } else {
            "without"
        };
        let checked = match (&self.browser, adapter) {
            (Some(_), Some(a)) => format!(
                "In the browser: each file run by transformers.js in headless Chromium (WebGPU \
                    adapter: {} {}, {shader_f16} shader-f16) on the first {} prompts, under the \
                    same bounds; details in <code>reports/browser.json</code>.",
                html_escape(a["vendor"].as_str().unwrap_or_default()),
                html_escape(a["architecture"].as_str().unwrap_or_default()),
                browser
                    .as_ref()
                    .map_or(serde_json::Value::Null, |b| b["prompts"].clone())
            ),
            (Some(_), None) => {
                "In the browser: each file run by transformers.js in headless Chromium (no WebGPU \
                    adapter), under the same bounds; details in \
                    <code>reports/browser.json</code>."
                    .to_string()
            }
            (None, _) => {
                "In the browser: not checked in this build (add <code>[verify.browser]</code> to \
                    run every file in headless Chromium on WebGPU); fp16 and q4f16 need the GPU's \
                    shader-f16."
                    .to_string()
            }
        };
        let _ = write!(
            html,
            "</table></div><p>{checked} The page loads {} on WebAssembly and {} on WebGPU.</p>",
            self.dtype, self.webgpu_dtype
        );
        html.push_str(&self.four_bit_section(ctx));
        html.push_str(
            "<p>Bounds per dtype: <code>[verify.tolerance.D]</code> or symb's defaults; \
            details in <code>reports/verify.D.json</code>. Try the model: <a \
            href=\"index.html\">the playground</a> (<code>symb serve</code>).</p></body></html>\n",
        );
        Ok(html)
    }

    /// The card's section on the LoRA adapter: what `adapter/` holds and the
    /// Python that puts it on its base, when the base can be had.
    /// How each 4-bit file's blocks were made (`reports/quantize.D.json`):
    /// calibrated or rounded, and a mixed file's weights in 8 bits, its size
    /// beside every weight in 4 and in 8 bits, and its candidates' size and
    /// KL on the calibration windows, drawn.
    fn four_bit_section(&self, ctx: &StageContext<'_>) -> String {
        use std::fmt::Write;
        let mut html = String::new();
        for dtype in self.dtypes.iter().filter(|d| d.is_4bit()) {
            let Some(q) = artifact_json(ctx, Artifact::new(dtype.producer_stage(), "report.json"))
            else {
                continue;
            };
            if html.is_empty() {
                html.push_str("<h2>4-bit files</h2>");
            }
            let how = match q["calibration_tokens"].as_u64() {
                Some(tokens) if tokens > 0 => format!(
                    "{} of {} weights' blocks chosen by GPTQ with their inputs over {tokens} tokens                     of the train split",
                    q["weights_calibrated"], q["weights_quantized"]
                ),
                _ => "every block rounded to nearest (no calibration)".to_string(),
            };
            let _ = write!(
                html,
                "<p><code>{}</code>: {how}.",
                html_escape(dtype.file_name())
            );
            let m = &q["mixed"];
            if !m.is_object() {
                html.push_str("</p>");
                continue;
            }
            let mb = |v: &serde_json::Value| format!("{:.2}", v.as_f64().unwrap_or(0.0) / 1e6);
            let weights = m["weights"].as_array().cloned().unwrap_or_default();
            let eight: Vec<String> = weights
                .iter()
                .filter(|w| w["bits"] == 8)
                .map(|w| {
                    format!(
                        "<code>{}</code>",
                        html_escape(w["weight"].as_str().unwrap_or(""))
                    )
                })
                .collect();
            let bound = m["bounds"]["kl_divergence"].as_f64();
            let _ = write!(
                html,
                " Mixed: {} of {} weights in 8-bit blocks{}{}: {} MB, against {} MB with every                 weight in 4 bits and {} MB with every one in 8. In 8 bits: {}.</p>",
                eight.len(),
                weights.len(),
                bound.map_or(String::new(), |b| format!(" to meet KL ≤ {}", figure(b, 6))),
                if m["met"] == true {
                    ""
                } else {
                    " (not met on the calibration windows even with all of them)"
                },
                mb(&q["file_bytes"]),
                mb(&m["uniform_4bit_bytes"]),
                mb(&m["uniform_8bit_bytes"]),
                if eight.is_empty() {
                    "none".to_string()
                } else {
                    eight.join(", ")
                }
            );
            html.push_str(&candidates_svg(m, bound));
        }
        html
    }

    fn adapter_section(&self, ctx: &StageContext<'_>, adapter: &AdapterCard) -> String {
        let config = artifact_json(ctx, ADAPTER_CONFIG).unwrap_or_default();
        let vocab = if self.vocab {
            artifact_json(ctx, VOCAB_REPORT)
        } else {
            None
        };
        let rows_in_adapter = !config["trainable_token_indices"].is_null();
        let targets: Vec<String> = config["target_modules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .map(|t| format!("`{t}`"))
            .collect();
        let mut md = format!(
            "\n## The LoRA adapter\n\n`adapter/` is the LoRA adapter in PEFT's format (rank {}, on {})",
            config["r"],
            targets.join(", ")
        );
        if let (true, Some(v)) = (rows_in_adapter, &vocab) {
            md.push_str(&format!(
                ", with the embedding rows of the {} new tokens",
                v["new_tokens"]
            ));
        }
        md.push_str(". `model.safetensors` is the model with it merged. ");
        // The vocabulary the adapter's base has: (size, new rows as transformers starts them).
        let grown = vocab.as_ref().map(|v| {
            (
                v["vocab_size"].clone(),
                rows_in_adapter || v["init"] == "mean",
            )
        });
        let base = match (&adapter.base, grown) {
            (_, grown) if adapter.with_base => {
                let grew = grown.map_or(String::new(), |(n, _)| {
                    format!(" (the base, its vocabulary grown to {n} tokens)")
                });
                md.push_str(&format!(
                    "`adapter/base/` holds the weights it was trained on{grew}. With PEFT:\n"
                ));
                ("\"adapter/base\"".to_string(), String::new(), None)
            }
            (None, _) => {
                md.push_str(
                    "Its base is the random weights symb started from, which this folder \
                    does not hold: `[export] adapter = \"with-base\"` puts them in \
                    `adapter/base/`.\n",
                );
                return md;
            }
            (Some(_), Some((_, false))) => {
                md.push_str(
                    "Its base's new rows started from symb's random draw (`vocab.init = \
                    \"normal\"`) and the adapter does not hold them (`finetune.train_new_tokens = \
                    false`): `[export] adapter = \"with-base\"` puts that base in \
                    `adapter/base/`.\n",
                );
                return md;
            }
            (Some((args, comment)), grown) => {
                md.push_str("To put it on its base yourself, with PEFT");
                if grown.is_some() {
                    let rows = if rows_in_adapter {
                        "the adapter holds their rows"
                    } else {
                        "their rows start where symb started them, at the mean of the others"
                    };
                    md.push_str(&format!(
                        " (the base's vocabulary grown to take the new tokens: {rows})"
                    ));
                }
                md.push_str(":\n");
                (args.clone(), comment.clone(), grown.map(|(n, _)| n))
            }
        };
        let (args, comment, resize) = base;
        let comment = if comment.is_empty() {
            String::new()
        } else {
            format!("  # {comment}")
        };
        md.push_str(&format!(
            "\n```python\nfrom peft import PeftModel\nfrom transformers import \
            AutoModelForCausalLM\n\nbase = \
            AutoModelForCausalLM.from_pretrained({args}){comment}\n"
        ));
        if let Some(n) = resize {
            md.push_str(&format!(
                "base.resize_token_embeddings({n})  # config.json's vocab_size\n"
            ));
        }
        md.push_str("model = PeftModel.from_pretrained(base, \"adapter\")\n```\n");
        md
    }

    /// `README.md`: a Hugging Face model card (YAML metadata for the Hub,
    /// what the model is, each file's verification, how to load it).
    fn card(&self, ctx: &StageContext<'_>, samples: &serde_json::Value) -> String {
        use std::fmt::Write;
        let json = |artifact| artifact_json(ctx, artifact);
        let card = &self.card;
        let prompt = if self.web.prompt.trim().is_empty() {
            self.examples(ctx)
                .into_iter()
                .next()
                .unwrap_or_else(|| "Hello".to_string())
        } else {
            self.web.prompt.clone()
        };
        // YAML: every value a JSON string, which YAML reads as itself.
        let quote = |s: &str| serde_json::to_string(s).expect("a string");
        let mut md =
            String::from("---\nlibrary_name: transformers.js\npipeline_tag: text-generation\n");
        if let Some(base) = &card.base_model {
            let _ = writeln!(md, "base_model: {}", quote(base));
        }
        if let Some(license) = &card.license {
            let _ = writeln!(md, "license: {}", quote(license));
        }
        if !card.language.is_empty() {
            md.push_str("language:\n");
            for language in &card.language {
                let _ = writeln!(md, "- {}", quote(language));
            }
        }
        md.push_str("tags:\n- symb\n- onnx\n- transformers.js\n");
        if card.method.starts_with("LoRA") {
            md.push_str("- lora\n");
        }
        md.push_str("---\n\n");
        let _ = write!(md, "# {}\n\n{}", self.title, card.method);
        if !card.corpus.is_empty() {
            let files: Vec<String> = card.corpus.iter().map(|f| format!("`{f}`")).collect();
            let joiner =
                if card.method.ends_with("from scratch") || card.method.ends_with("fine-tuned") {
                    " on"
                } else {
                    ", trained on"
                };
            let _ = write!(md, "{joiner} {}", files.join(", "));
        }
        md.push_str(
            ". Built with symb: every ONNX file below was run by ONNX Runtime and checked \
            against the model's own forward pass (candle) before it was written.\n\n",
        );
        if self.finetune
            && let Some(m) = json(TRAINING_METRICS)
        {
            let number = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
            let _ = write!(
                md,
                "## Training\n\n{} steps on {} tokens; eval perplexity {:.1} before, {:.1} \
                after{}.\n\n",
                m["steps"],
                m["tokens"],
                number("initial_perplexity"),
                number("final_perplexity"),
                kept_note(&m)
            );
        }
        let warnings = self.warnings(ctx);
        if !warnings.is_empty() {
            md.push_str("## Warnings\n\n");
            for (stage, w) in &warnings {
                let _ = writeln!(
                    md,
                    "- **{}** ({stage}): {}. What to do: {}.",
                    w.code, w.message, w.help
                );
            }
            md.push('\n');
        }
        if let Some(task) = task_line(samples) {
            let _ = write!(md, "## Task metrics\n\n{task}\n\n");
        }
        let shown: Vec<&serde_json::Value> = samples["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .take(3)
            .collect();
        if !shown.is_empty() {
            let _ = write!(
                md,
                "## Samples\n\nGreedy continuations of eval prompts ({}):\n\n",
                self.dtype
            );
            for row in shown {
                let _ = writeln!(
                    md,
                    "- {} → {}",
                    quote(row["prompt"].as_str().unwrap_or_default()),
                    quote(row[self.dtype.name()].as_str().unwrap_or_default())
                );
            }
            md.push('\n');
        }
        md.push_str(
            "## Files and their verification\n\n| dtype | file | MB | max abs error | top-1 \
                agreement | KL divergence | perplexity ratio | greedy match \
                |\n|---|---|---|---|---|---|---|---|\n",
        );
        for ((onnx, dtype), twin) in self.files().zip(&self.dtypes).zip(self.twins(ctx)) {
            let (bytes, file) = (file_bytes(ctx, onnx), onnx.file);
            let report = json(Artifact::verify_report(*dtype)).unwrap_or_default();
            let m = &report["metrics"];
            let cell = |k: &str, digits: usize| {
                m[k].as_f64().map_or("".to_string(), |v| figure(v, digits))
            };
            let default = if *dtype == self.dtype {
                " (default)"
            } else {
                ""
            };
            let same = twin.map_or(String::new(), |t| format!(" (the {t} file's bytes)"));
            let _ = writeln!(
                md,
                "| {dtype}{default} | `onnx/{file}`{same} | {:.1} | {} | {} | {} | {} | {} |",
                bytes as f64 / 1e6,
                cell("max_abs_error", 4),
                cell("top1_agreement", 4),
                cell("kl_divergence", 6),
                cell("perplexity_ratio", 4),
                cell("greedy_match", 3)
            );
        }
        let _ = write!(
            md,
            "\nThe bounds each file met are in `reports/verify.<dtype>.json`; `report.html` shows it all, and `index.html` is a playground (`symb serve` serves this folder).\n\n\
             ## Use it\n\n\
             In JavaScript, with [transformers.js](https://huggingface.co/docs/transformers.js) (in a browser or Node):\n\n\
             ```js\n\
             import {{ pipeline }} from '@huggingface/transformers';\n\n\
             // This folder on the Hub (its id), or served locally (see env.localModelPath).\n\
             const generator = await pipeline('text-generation', {id}, {{ dtype: '{dtype}' }});\n\
             const [out] = await generator({prompt}, {{ max_new_tokens: {max_new_tokens} }});\n\
             console.log(out.generated_text);\n\
             ```\n\n\
             In Python, with transformers (`model.safetensors` is the same model in PyTorch's layout):\n\n\
             ```python\n\
             from transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             tokenizer = AutoTokenizer.from_pretrained({id})\n\
             model = AutoModelForCausalLM.from_pretrained({id})\n\
             ids = tokenizer({prompt}, return_tensors=\"pt\")\n\
             print(tokenizer.decode(model.generate(**ids, max_new_tokens={max_new_tokens})[0]))\n\
             ```\n",
            id = quote(&format!("OWNER/{}", self.title)),
            dtype = self.dtype,
            prompt = quote(&prompt),
            max_new_tokens = self.web.max_new_tokens,
        );
        if let Some(adapter) = &card.adapter {
            md.push_str(&self.adapter_section(ctx, adapter));
        }
        if card.license.is_none() {
            md.push_str("\nLicense: not stated (set `[project] license` in symb.toml).\n");
        }
        md
    }

    /// Example prompts: the start of the verification's prompts (from the
    /// eval split), a few words each, since nobody can guess a sentence in a
    /// new language.
    fn examples(&self, ctx: &StageContext<'_>) -> Vec<String> {
        let reference = artifact_json(ctx, WORKLOAD).unwrap_or_default();
        let mut examples: Vec<String> = Vec::new();
        for prompt in reference["workload"]["prompts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            // The first words (half the line's, at most six): a prompt the
            // model can go on with, not a sentence that has ended.
            let all: Vec<&str> = prompt[0]
                .as_str()
                .unwrap_or_default()
                .split_whitespace()
                .collect();
            let words: Vec<&str> = all[..(all.len() / 2).clamp(all.len().min(1), 6)].to_vec();
            let example = words.join(" ");
            if !example.is_empty() && !examples.contains(&example) && examples.len() < 4 {
                examples.push(example);
            }
        }
        examples
    }

    /// What the model writes after the first eval prompts, in fp32 (candle)
    /// and in the page's dtype (ONNX Runtime), beside the eval data's reply;
    /// with replies, exact match and chrF over every prompt that has one.
    fn samples(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let reference = artifact_json(ctx, WORKLOAD).unwrap_or_default();
        let verify = artifact_json(ctx, Artifact::verify_report(self.dtype)).unwrap_or_default();
        let tokenizer =
            tokenizers::Tokenizer::from_file(self.model_stage.file("tokenizer.json").path(ctx)?)
                .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
        let eos = reference["workload"]["eos"].as_u64();
        let reply = |tokens: &serde_json::Value| -> String {
            let ids: Vec<u32> = tokens
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_u64())
                .filter(|&t| Some(t) != eos)
                .map(|t| t as u32)
                .collect();
            tokenizer
                .decode(&ids, true)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let empty = Vec::new();
        let prompts = reference["workload"]["prompts"]
            .as_array()
            .unwrap_or(&empty);
        let expected = reference["workload"]["expected"]
            .as_array()
            .unwrap_or(&empty);
        let greedy = reference["greedy"].as_array().unwrap_or(&empty);
        let onnx = verify["prompts"].as_array().unwrap_or(&empty);
        let mut rows = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let fp32 = reply(&greedy.get(i).cloned().unwrap_or_default());
            let own = onnx
                .get(i)
                .map(|p| &p["onnx_greedy"])
                .filter(|g| g.is_array());
            let in_dtype = own.map_or_else(|| fp32.clone(), reply);
            rows.push(serde_json::json!({
                "prompt": prompt[0],
                "fp32": fp32,
                self.dtype.name(): in_dtype,
                "expected": expected.get(i).and_then(|e| e.as_str()).map(str::trim),
            }));
        }
        let answered: Vec<&serde_json::Value> =
            rows.iter().filter(|r| r["expected"].is_string()).collect();
        let mut task = serde_json::Value::Null;
        if !answered.is_empty() {
            task = serde_json::json!({ "prompts": answered.len() });
            for side in ["fp32", self.dtype.name()] {
                let pairs: Vec<(&str, &str)> = answered
                    .iter()
                    .map(|r| {
                        (
                            r[side].as_str().unwrap_or_default(),
                            r["expected"].as_str().unwrap_or_default(),
                        )
                    })
                    .collect();
                let exact = pairs.iter().filter(|(a, b)| a == b).count();
                task[side] = serde_json::json!({
                    "exact_match": exact as f64 / pairs.len() as f64,
                    "chrf": crate::model::health::chrf(pairs.iter().copied()),
                });
            }
        }
        let mut samples = serde_json::json!({ "dtype": self.dtype, "samples": rows });
        if !task.is_null() {
            samples["task"] = task;
        }
        Ok(samples)
    }

    /// The playground page (`index.html`): loads the folder with
    /// transformers.js and generates from a typed prompt, with tokens/s.
    fn page(&self, ctx: &StageContext<'_>) -> String {
        let options: String = self
            .dtypes
            .iter()
            .map(|&d| {
                format!(
                    "<option value=\"{d}\"{}>{d}</option>",
                    if d == self.dtype { " selected" } else { "" }
                )
            })
            .collect();
        let examples = self.examples(ctx);
        let sizes: BTreeMap<String, u64> = self
            .files()
            .zip(&self.dtypes)
            .map(|(onnx, dtype)| (dtype.to_string(), file_bytes(ctx, onnx)))
            .collect();
        let library = &self.web.transformers_js;
        let (shown, wasm) = match library {
            TransformersJs::Bundle => ("this folder (web/)".to_string(), Some(WEB_FOLDER)),
            TransformersJs::Url(url) => (url.split('/').nth(2).unwrap_or(url).to_string(), None),
        };
        // In a <script>: JSON with `<` escaped, so no `</script>` ends it early.
        let script_json = |v: &serde_json::Value| v.to_string().replace('<', "\\u003c");
        fill(
            PAGE,
            &[
                ("NAME", html_escape(&self.title)),
                ("EXAMPLES", script_json(&serde_json::json!(examples))),
                ("SIZES", script_json(&serde_json::json!(sizes))),
                ("TRANSFORMERS_JS_SHOWN", html_escape(&shown)),
                ("PROMPT", html_escape(&self.web.prompt)),
                ("DTYPE_OPTIONS", options),
                (
                    "DEVICE_DTYPES",
                    script_json(
                        &serde_json::json!({ "wasm": self.dtype, "webgpu": self.webgpu_dtype }),
                    ),
                ),
                ("MAX_NEW_TOKENS", self.web.max_new_tokens.to_string()),
                (
                    "TRANSFORMERS_JS_URL",
                    script_json(&serde_json::json!(library.url())),
                ),
                (
                    "TRANSFORMERS_JS_WASM",
                    script_json(&serde_json::json!(wasm)),
                ),
            ],
        )
    }
}

/// The default dtype among `targets`: the one fastest in a browser's
/// WebAssembly, where a page runs by default, for its size. q8 first (8-bit
/// storage that ONNX Runtime folds back to floats at load: 0.28 times
/// fp32's download, 0.8 to 0.9 times its speed in Chromium on SmolLM2-135M,
/// `bench/real_model.py`), then the dynamic 8-bit files, then fp32, then
/// the first target.
/// Not 4-bit: onnxruntime-web's WebAssembly MatMulNBits dequantizes every
/// weight on every call, 5 to 8 times slower than fp32 per token on the
/// SmolLM2-135M and GPT-2 small shapes (`bench/web.py`), the reference
/// workflow's q4 file alike; 4-bit is for WebGPU and native runtimes.
pub fn default_dtype(targets: &[Dtype]) -> Dtype {
    [Dtype::Q8, Dtype::Int8, Dtype::Uint8, Dtype::Fp32]
        .into_iter()
        .find(|d| targets.contains(d))
        .unwrap_or(targets[0])
}

/// The dtype a page loads on WebGPU: 4-bit (MatMulNBits has WebGPU
/// kernels, and a GPU reads a quarter of fp32's bytes), then fp32, then
/// 8-bit (q8 runs as fp32 once loaded; int8's MatMulInteger has no WebGPU
/// kernel: ONNX Runtime runs it on the CPU). fp16 and q4f16 come last: they need the adapter's `shader-f16`,
/// which most GPUs have and SwiftShader's software adapter has not, so
/// symb's tests cannot prove them there.
pub fn webgpu_dtype(targets: &[Dtype]) -> Dtype {
    [
        Dtype::Q4,
        Dtype::Fp32,
        Dtype::Q8,
        Dtype::Int8,
        Dtype::Uint8,
        Dtype::Q4f16,
        Dtype::Fp16,
    ]
    .into_iter()
    .find(|d| targets.contains(d))
    .unwrap_or(targets[0])
}

impl BundleStage {
    /// What it reads: the model's config and tokenizer, the reference's
    /// workload, every file and its report, and what the other stages report.
    fn inputs(&self) -> Vec<Artifact> {
        let mut inputs = vec![
            self.model_stage.file("config.json"),
            self.model_stage.file("tokenizer.json"),
            WORKLOAD,
        ];
        if self.vocab {
            inputs.push(VOCAB_REPORT);
        }
        inputs.extend(self.dtypes.iter().map(|&d| Artifact::onnx(d)));
        inputs.extend(self.dtypes.iter().map(|&d| Artifact::verify_report(d)));
        inputs.extend(
            self.dtypes
                .iter()
                .filter(|d| d.is_4bit())
                .map(|d| Artifact::new(d.producer_stage(), "report.json")),
        );
        if self.browser.is_some() {
            inputs.push(BROWSER_REPORT);
        }
        if self.finetune {
            inputs.push(TRAINING_METRICS);
        }
        inputs.extend(self.warning_files());
        inputs
    }

    /// The `warnings.json` of each stage here that warns.
    fn warning_files(&self) -> impl Iterator<Item = Artifact> + '_ {
        WARNINGS.into_iter().filter(|w| match w.stage {
            "tokenizer" => self.tokenizer,
            "finetune" => self.finetune,
            _ => true,
        })
    }

    /// What the stages warned of, with the stage's name.
    fn warnings(&self, ctx: &StageContext<'_>) -> Vec<(&'static str, crate::cache::Warning)> {
        self.warning_files()
            .flat_map(|w| {
                let list: Vec<crate::cache::Warning> = artifact_json(ctx, w)
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default();
                list.into_iter().map(move |x| (w.stage, x))
            })
            .collect()
    }
}

impl Stage for BundleStage {
    fn name(&self) -> &str {
        "bundle"
    }
    fn kind(&self) -> &'static str {
        "bundle"
    }
    fn version(&self) -> u32 {
        // 5: no verify time column (the reports hold no timing). 6: the pad
        // token declared in config.json and tokenizer_config.json; README.md.
        // 7: a file with another dtype's bytes says so. 8: a dtype per
        // device (WebAssembly, WebGPU); the page picks the device. 9:
        // report.html says how verify goes along candle's tokens. 10:
        // `model_input_names` (and `add_bos_token` where the tokenizer
        // adds one) in tokenizer_config.json. 11: the stage is its settings.
        // 12: report.html's 4-bit section. 13: the warnings, the kept step,
        // the samples and task metrics; each row a card on a phone.
        13
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
    /// The model stage publishes a `config.json` (and merge a
    /// `tokenizer_config.json`) too; these, later in the plan, replace them.
    fn publishes(&self) -> Vec<(String, String)> {
        [
            "config.json",
            "tokenizer_config.json",
            "index.html",
            "report.html",
            "README.md",
        ]
        .iter()
        .map(|f| (f.to_string(), f.to_string()))
        .chain([(
            "samples.json".to_string(),
            "reports/samples.json".to_string(),
        )])
        .collect()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<serde_json::Value, StageError> {
        let mut config: serde_json::Value =
            crate::model::read_json(self.model_stage.file("config.json").path(ctx)?)
                .map_err(super::shared::model_error)?;
        let mut external = BTreeMap::new();
        for onnx in self.files() {
            let chunks = data_inputs(ctx, onnx).len();
            if chunks > 0 {
                external.insert(onnx.file.to_string(), chunks);
            }
        }
        let object = config
            .as_object_mut()
            .ok_or_else(|| StageError::failed("the model's config.json is not an object"))?;
        let js = object
            .entry("transformers.js_config")
            .or_insert_with(|| serde_json::json!({}));
        if !js.is_object() {
            *js = serde_json::json!({});
        }
        let js = js.as_object_mut().expect("an object");
        js.insert("dtype".into(), self.dtype.name().into());
        // transformers.js v4 merges `device_config[device]` over these for
        // the device a model is loaded on.
        js.insert("device_config".into(), serde_json::json!({ "wasm": { "dtype": self.dtype }, "webgpu": { "dtype": self.webgpu_dtype } }));
        if external.is_empty() {
            js.remove("use_external_data_format");
        } else {
            js.insert(
                "use_external_data_format".into(),
                serde_json::to_value(&external).expect("serialises"),
            );
        }
        let base = self.model_stage.optional_file(ctx, "tokenizer_config.json");
        let tokenizer_path = self.model_stage.file("tokenizer.json").path(ctx)?;
        let tokenizer_config = super::shared::tokenizer_config(
            self.model_stage.file("config.json").path(ctx)?,
            tokenizer_path,
            base,
        )?;
        // The pad token the tokenizer declares, by id, as transformers' configs have it.
        if let Some(pad) = tokenizer_config["pad_token"].as_str()
            && config
                .get("pad_token_id")
                .is_none_or(serde_json::Value::is_null)
        {
            let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
                .map_err(|e| StageError::failed(format!("cannot load the tokenizer: {e}")))?;
            if let Some(id) = tokenizer.token_to_id(pad) {
                config["pad_token_id"] = id.into();
            }
        }
        super::shared::write_json(&ctx.output("config.json"), &config)?;
        super::shared::write_json(&ctx.output("tokenizer_config.json"), &tokenizer_config)?;
        let page = ctx.output("index.html");
        std::fs::write(&page, self.page(ctx)).map_err(|e| super::shared::io(&page, e))?;
        let report = ctx.output("report.html");
        let samples = self.samples(ctx)?;
        super::shared::write_json(&ctx.output("samples.json"), &samples)?;
        std::fs::write(&report, self.report(ctx, &samples)?)
            .map_err(|e| super::shared::io(&report, e))?;
        let card = ctx.output("README.md");
        std::fs::write(&card, self.card(ctx, &samples)).map_err(|e| super::shared::io(&card, e))?;
        Ok(serde_json::json!({ "dtype": self.dtype, "external_data": external }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_each_placeholder_once() {
        let page = fill(
            "<p>{{A}}</p><script>{{B}}</script>{{C}}",
            &[("A", "{{B}}".to_string()), ("B", "[1]".to_string())],
        );
        assert_eq!(
            page, "<p>{{B}}</p><script>[1]</script>{{C}}",
            "a value is not filled again; an unknown name stays"
        );
    }

    #[test]
    fn small_metrics_are_shown_in_scientific_notation() {
        assert_eq!(figure(4.4e-6, 4), "4.4e-6");
        assert_eq!(figure(0.8833, 4), "0.8833");
        assert_eq!(figure(0.0, 4), "0.0000");
    }
}
