//! Generates the ONNX protobuf types from `proto/onnx.proto` (unmodified)
//! with `protox`, a protobuf compiler in Rust, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    commit();
    locked_versions()?;
    let descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    // Tensor bytes as `bytes::Bytes`: a model decoded from a mapped file
    // points into it instead of copying every weight.
    prost_build::Config::new()
        .bytes([".onnx.TensorProto.raw_data"])
        .compile_fds(descriptors)?;
    Ok(())
}

/// `SYMB_COMMIT` for `symb --version`: the commit and its date, from git
/// when the source is a checkout (else "no commit", as from a tarball). It
/// names the build only: stage keys use the crate version.
fn commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let described = git(&["log", "-1", "--format=%h %cs"]).filter(|s| !s.is_empty());
    let text = described.unwrap_or_else(|| "no commit".to_string());
    println!("cargo:rustc-env=SYMB_COMMIT={text}");
    // Again when HEAD moves (a commit, a checkout).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let head = std::path::Path::new(&dir).join("HEAD");
        println!("cargo:rerun-if-changed={}", head.display());
        if let Ok(text) = std::fs::read_to_string(&head)
            && let Some(reference) = text.strip_prefix("ref: ")
        {
            let path = std::path::Path::new(&dir).join(reference.trim());
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

/// `SYMB_LOCKED_<NAME>`: the version Cargo.lock pins for each library whose
/// version enters stage keys, so that a key names the library that built
/// the artifact and cannot drift from it.
fn locked_versions() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock")
        .map_err(|e| format!("symb's build reads Cargo.lock for the versions in its keys: {e}"))?;
    for (package, var) in [("candle-core", "CANDLE"), ("tokenizers", "TOKENIZERS")] {
        let name = format!("name = \"{package}\"\n");
        let mut versions = lock.split("[[package]]\n").filter_map(|entry| {
            let rest = entry.strip_prefix(&name)?;
            let line = rest.lines().find(|l| l.starts_with("version = "))?;
            Some(line["version = ".len()..].trim_matches('"').to_string())
        });
        let version = versions
            .next()
            .ok_or(format!("Cargo.lock has no `{package}`"))?;
        if let Some(other) = versions.next() {
            return Err(format!("Cargo.lock has two `{package}`s ({version} and {other})").into());
        }
        println!("cargo:rustc-env=SYMB_LOCKED_{var}={version}");
    }
    Ok(())
}
