//! transformers.js and the ONNX Runtime Web files it loads, for a page that
//! works with no network (`[web] transformers_js = "bundle"`: the output
//! folder's `web/`) and for checking the tokenizer where it runs (Node).
//!
//! They are taken once from the npm registry's tarballs at pinned versions
//! (those transformers.js 4.3.1's own `package.json` pins), each checked
//! against the integrity the registry publishes for it (sha512), and kept in
//! the tools folder beside ONNX Runtime (`~/.cache/symb`, `SYMB_TOOLS_DIR`).
//! `npm_config_registry` (npm's own setting) names a mirror. Later runs
//! only check the files' sizes.

use std::io::Seek;
use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha512};

use super::runtime::{RuntimeError, install, stream, tools_dir};

/// One npm package's tarball, and what is taken out of it.
struct Package {
    name: &'static str,
    version: &'static str,
    /// `dist.integrity`, as the registry publishes it.
    integrity: &'static str,
    /// Members (under `package/`) and their sizes.
    files: &'static [(&'static str, u64)],
}

const PACKAGES: [Package; 2] = [
    Package {
        name: "@huggingface/transformers",
        version: "4.3.1",
        integrity: "sha512-5+voSeUCFK6PCKlY15dPhNOKq3/zOTxDN7oC+Wy9dFb1QZ0TSQomZRRy7URRK8YRuUoE9fGMQTTPC5d/\
            pWBJhA==",
        files: &[("dist/transformers.min.js", 586_230)],
    },
    // transformers.min.js holds onnxruntime-web's JavaScript; given a folder
    // (`env.backends.onnx.wasm.wasmPaths`), it loads these two from it.
    Package {
        name: "onnxruntime-web",
        version: "1.31.0-dev.20260914-8d85527a0",
        integrity: "sha512-Iy7rtadoBgxS/LLvDr3QW38DB1PNXRnr0GJMcL0TAt7c9qjgVQl83UlGCVyeAnK2InpmW8Uc3P\
            L8XIuqtDeF6g==",
        files: &[
            ("dist/ort-wasm-simd-threaded.asyncify.mjs", 53_057),
            ("dist/ort-wasm-simd-threaded.asyncify.wasm", 26_861_777),
        ],
    },
];

/// Where a page gets transformers.js when it is not bundled.
pub const CDN: &str =
    "https://cdn.jsdelivr.net/npm/@huggingface/transformers@4.3.1/dist/transformers.min.js";

/// The library's module, the file a page or Node imports.
pub const SCRIPT: &str = "transformers.min.js";

/// What the bundled files are, for keys and reports.
pub fn identity() -> String {
    PACKAGES
        .iter()
        .map(|p| format!("{}@{}", p.name, p.version))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The provisioned files, in one folder.
#[derive(Debug, Clone)]
pub struct Library {
    pub dir: PathBuf,
}

impl Library {
    /// The module to import.
    pub fn script(&self) -> PathBuf {
        self.dir.join(SCRIPT)
    }

    /// Every file, by name: what a page's `web/` folder holds.
    pub fn files(&self) -> Vec<(&'static str, PathBuf)> {
        file_names()
            .map(|name| (name, self.dir.join(name)))
            .collect()
    }
}

/// The names of the files a page's `web/` folder holds.
pub fn file_names() -> impl Iterator<Item = &'static str> {
    PACKAGES
        .iter()
        .flat_map(|p| p.files)
        .map(|(member, _)| file_name(member))
}

fn file_name(member: &'static str) -> &'static str {
    member.rsplit('/').next().unwrap_or(member)
}

/// The library in the tools folder, fetched the first time.
pub fn library() -> Result<Library, RuntimeError> {
    let registry = std::env::var("npm_config_registry")
        .or_else(|_| std::env::var("NPM_CONFIG_REGISTRY"))
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "https://registry.npmjs.org/".to_string());
    provision(&tools_dir()?, &registry)
}

/// The files under `dir`, fetched from `registry` and checked if they are
/// not there yet.
pub fn provision(dir: &Path, registry: &str) -> Result<Library, RuntimeError> {
    let folder = dir.join(format!("transformers.js-{}", PACKAGES[0].version));
    let library = Library { dir: folder };
    let io = |what: &str, p: &Path, e: std::io::Error| {
        RuntimeError::Provision(format!("cannot {what} `{}`: {e}", p.display()))
    };
    let present = |package: &Package| {
        package.files.iter().all(|(member, bytes)| {
            std::fs::metadata(library.dir.join(file_name(member))).is_ok_and(|m| m.len() == *bytes)
        })
    };
    if PACKAGES.iter().all(present) {
        return Ok(library);
    }
    std::fs::create_dir_all(&library.dir).map_err(|e| io("create", &library.dir, e))?;
    // Two processes fetching at once: one fetches, the other waits and finds it.
    let _lock = crate::cache::CacheLock::acquire(&library.dir.join(".lock"), || {
        tracing::info!("waiting for another symb to fetch transformers.js")
    })
    .map_err(|e| RuntimeError::Provision(e.to_string()))?;
    for package in PACKAGES.iter().filter(|p| !present(p)) {
        fetch(package, &library.dir, registry)?;
    }
    Ok(library)
}

/// Fetches one package's tarball into `folder`, checks it, and unpacks its files.
fn fetch(package: &Package, folder: &Path, registry: &str) -> Result<(), RuntimeError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        RuntimeError::Provision(format!("cannot {what} `{}`: {e}", p.display()))
    };
    let base = package.name.rsplit('/').next().unwrap_or(package.name);
    let url = format!(
        "{}/{}/-/{base}-{}.tgz",
        registry.trim_end_matches('/'),
        package.name,
        package.version
    );
    let what = format!("{}@{}", package.name, package.version);
    tracing::warn!("fetching {what} (once) from {url}");
    let mut tarball =
        tempfile::tempfile_in(folder).map_err(|e| io("create a file in", folder, e))?;
    let mut hasher = Sha512::new();
    stream(&url, &mut tarball, |chunk| hasher.update(chunk)).map_err(|e| {
        RuntimeError::Provision(format!(
            "cannot fetch {what} from {url}: {e}\n  offline? set `[web] transformers_js` to a \
            URL the page loads it from (the CDN: \"{}\")",
            CDN
        ))
    })?;
    let integrity = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(hasher.finalize())
    );
    let published = package.integrity;
    if integrity != published {
        return Err(RuntimeError::Provision(format!(
            "{what} from {url} has integrity {integrity}, not the registry's {published}; \
            nothing was installed (a proxy or mirror altered it?)"
        )));
    }
    tarball
        .rewind()
        .map_err(|e| RuntimeError::Provision(format!("cannot read {what}'s tarball: {e}")))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tarball));
    let bad = |e: std::io::Error| {
        RuntimeError::Provision(format!(
            "{what}'s tarball from {url} cannot be unpacked: {e}"
        ))
    };
    let mut found = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let Some(&(member, bytes)) = package
            .files
            .iter()
            .find(|(m, _)| path == format!("package/{m}"))
        else {
            continue;
        };
        let target = folder.join(file_name(member));
        let mut staged = tempfile::NamedTempFile::new_in(folder)
            .map_err(|e| io("create a file in", folder, e))?;
        let copied = std::io::copy(&mut entry, &mut staged).map_err(bad)?;
        if copied != bytes {
            return Err(RuntimeError::Provision(format!(
                "`{member}` in {what} has {copied} bytes, not {bytes}; nothing was installed"
            )));
        }
        install(staged, &target)?;
        found.push(member);
    }
    if let Some((missing, _)) = package.files.iter().find(|(m, _)| !found.contains(m)) {
        return Err(RuntimeError::Provision(format!(
            "{what}'s tarball from {url} has no `package/{missing}`"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_names_both_packages_at_their_pinned_versions() {
        assert_eq!(
            identity(),
            "@huggingface/transformers@4.3.1 onnxruntime-web@1.31.0-dev.20260914-8d85527a0"
        );
        let names: Vec<&str> = Library { dir: "w".into() }
            .files()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                SCRIPT,
                "ort-wasm-simd-threaded.asyncify.mjs",
                "ort-wasm-simd-threaded.asyncify.wasm"
            ]
        );
    }
}
