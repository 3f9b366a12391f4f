//! The ONNX Runtime library that `ort` loads at run time.
//!
//! `ORT_DYLIB_PATH` names one explicitly. Otherwise symb uses the plain C-API
//! library inside PyPI's `onnxruntime` wheel (it does not depend on Python):
//! the wheel is fetched once, checked against its published sha256, the one
//! library file is taken out of it, checked against its own sha256, and kept
//! in the user's cache folder (`$XDG_CACHE_HOME/symb`, or `~/.cache/symb`;
//! `SYMB_TOOLS_DIR` overrides). Later runs only check its size.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The ONNX Runtime release symb is built against (`ort`'s `api-30` runs it).
pub const VERSION: &str = "1.32.0";

/// One platform's wheel and the library inside it.
struct Wheel {
    os: &'static str,
    arch: &'static str,
    url: &'static str,
    sha256: &'static str,
    member: &'static str,
    library_sha256: &'static str,
    library_bytes: u64,
}

const PYPI: &str = "https://files.pythonhosted.org/packages";

/// The cp311 wheels of onnxruntime 1.32.0 (the C library is the same for every
/// Python version); digests as PyPI publishes them and as measured.
const WHEELS: [Wheel; 5] = [
    Wheel {
        os: "linux",
        arch: "x86_64",
        url: "1d/46/e6f356c9539d2eed44126de3421a81e217da2ad91b22dc11b379cb1e384f/onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl",
        sha256: "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d",
        member: "onnxruntime/capi/libonnxruntime.so.1.32.0",
        library_sha256: "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f",
        library_bytes: 34_824_680,
    },
    Wheel {
        os: "linux",
        arch: "aarch64",
        url: "b7/30/103820b32e9dc1d1fcfc5b519fd2de5bd699d25a25895caf5d726350d1b5/onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_aarch64.whl",
        sha256: "2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c",
        member: "onnxruntime/capi/libonnxruntime.so.1.32.0",
        library_sha256: "49852228a93995158b2a813d4df487d47a1b76b0eaa894507ef49e91b6d7954a",
        library_bytes: 27_165_936,
    },
    Wheel {
        os: "macos",
        arch: "aarch64",
        url: "b7/5d/50be370b540a6cb9ea173503f5418e8315dfe5757400ad7720542d348b94/onnxruntime-1.32.0-cp311-cp311-macosx_14_0_arm64.whl",
        sha256: "366b9e53d07812cc5c92822cecf7563b76a8a0f32ba3bb8dd232a206ac3bcb6c",
        member: "onnxruntime/capi/libonnxruntime.1.32.0.dylib",
        library_sha256: "fa585fabbea65b823b9a8f7e27d46aee3989d1be7e36b528203d3a1fd613aae7",
        library_bytes: 35_272_344,
    },
    Wheel {
        os: "windows",
        arch: "x86_64",
        url: "07/ff/c797464da311c580ec477077a5c65d7841599a46c35392b5978c0a5ae9a4/onnxruntime-1.32.0-cp311-cp311-win_amd64.whl",
        sha256: "d7e0c45cc5f456ad7805e6dd256a7662736cda9c2fd17becae194eb3c2f6df72",
        member: "onnxruntime/capi/onnxruntime.dll",
        library_sha256: "e9feebaed867b76f741c14ae64e056a3da64a153a61994f1fb48eadc7f9b3ba8",
        library_bytes: 22_668_640,
    },
    Wheel {
        os: "windows",
        arch: "aarch64",
        url: "bd/ff/e14181a5315745007f06612d963c6f739b371452b089b5b8109c2379bd32/onnxruntime-1.32.0-cp311-cp311-win_arm64.whl",
        sha256: "23361cdf98afac352d10aa7d9e0a10ceaeb02d38430fb693c6eff370196db62d",
        member: "onnxruntime/capi/onnxruntime.dll",
        library_sha256: "d3587771474d96427cc5683fa49440127e928622a5e9df0f3e24209ae1fc42ad",
        library_bytes: 20_798_816,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Provision(String),
    #[error("cannot load ONNX Runtime from `{path}`: {message}")]
    Load { path: PathBuf, message: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
}

impl From<ort::Error> for RuntimeError {
    fn from(e: ort::Error) -> Self {
        RuntimeError::Ort(e.to_string())
    }
}

/// Where the library comes from, for keys and messages.
#[derive(Debug, Clone)]
pub struct Library {
    pub path: PathBuf,
    /// `1.32.0` for the provisioned library; `ORT_DYLIB_PATH:<blake3>` for one the user named.
    pub identity: String,
}

/// The library to load: `ORT_DYLIB_PATH`, or the provisioned one (fetched
/// the first time).
pub fn library() -> Result<Library, RuntimeError> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if std::fs::metadata(&path).is_err() {
            return Err(RuntimeError::Provision(format!(
                "`ORT_DYLIB_PATH` names `{}`, which cannot be read",
                path.display()
            )));
        }
        return Ok(Library {
            path,
            identity: identity(),
        });
    }
    let path = provision(&tools_dir()?)?;
    Ok(Library {
        path,
        identity: VERSION.to_string(),
    })
}

/// The identity of the library a build would load, without fetching it: the
/// part of verify stage keys that says which runtime ran. Computed once per
/// process (a library named by `ORT_DYLIB_PATH` is hashed).
pub fn identity() -> String {
    static IDENTITY: OnceLock<String> = OnceLock::new();
    IDENTITY
        .get_or_init(
            || match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
                Some(path) => match crate::cache::hash_file(Path::new(&path)) {
                    Ok((digest, _)) => format!("ORT_DYLIB_PATH:{}", crate::cache::short(&digest)),
                    Err(_) => "ORT_DYLIB_PATH:unreadable".to_string(),
                },
                None => VERSION.to_string(),
            },
        )
        .clone()
}

/// The per-user folder for tools symb fetches.
pub(crate) fn tools_dir() -> Result<PathBuf, RuntimeError> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("SYMB_TOOLS_DIR") {
        return Ok(dir);
    }
    let base = if cfg!(windows) {
        var("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        var("HOME").map(|h| h.join("Library/Caches"))
    } else {
        var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))
    };
    base.map(|b| b.join("symb")).ok_or_else(|| {
        RuntimeError::Provision(
            "no cache folder for the tools symb fetches (ONNX Runtime, transformers.js): set \
            `SYMB_TOOLS_DIR` or `HOME` (or name ONNX Runtime's library in `ORT_DYLIB_PATH`)"
                .into(),
        )
    })
}

fn wheel_for_host() -> Result<&'static Wheel, RuntimeError> {
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    WHEELS
        .iter()
        .find(|w| w.os == os && w.arch == arch)
        .ok_or_else(|| {
            RuntimeError::Provision(format!(
                "symb has no ONNX Runtime {VERSION} \
            download for {os}/{arch}; install ONNX Runtime {VERSION} and set `ORT_DYLIB_PATH` to \
            its library"
            ))
        })
}

/// The library under `dir`, fetched from PyPI and checked if it is not there
/// yet (`SYMB_ONNXRUNTIME_WHEEL_URL` names another source of the same wheel).
pub fn provision(dir: &Path) -> Result<PathBuf, RuntimeError> {
    let wheel = wheel_for_host()?;
    let url = std::env::var("SYMB_ONNXRUNTIME_WHEEL_URL")
        .unwrap_or_else(|_| format!("{PYPI}/{}", wheel.url));
    provision_from(dir, &url)
}

/// [`provision`] from `url`: whatever comes must have the pinned digests.
pub fn provision_from(dir: &Path, url: &str) -> Result<PathBuf, RuntimeError> {
    let wheel = wheel_for_host()?;
    let folder = dir.join(format!("onnxruntime-{VERSION}-{}-{}", wheel.os, wheel.arch));
    let file_name = wheel.member.rsplit('/').next().expect("member has a name");
    let path = folder.join(file_name);
    let present = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() == wheel.library_bytes);
    if present(&path) {
        return Ok(path);
    }
    let io = |what: &str, p: &Path, e: std::io::Error| {
        RuntimeError::Provision(format!("cannot {what} `{}`: {e}", p.display()))
    };
    std::fs::create_dir_all(&folder).map_err(|e| io("create", &folder, e))?;
    // Two processes fetching at once: one fetches, the other waits and finds it.
    let _lock = crate::cache::CacheLock::acquire(&folder.join(".lock"), || {
        tracing::info!("waiting for another symb to fetch ONNX Runtime")
    })
    .map_err(|e| RuntimeError::Provision(e.to_string()))?;
    if present(&path) {
        return Ok(path);
    }
    tracing::warn!("fetching ONNX Runtime {VERSION} (once) from {url}");
    let mut wheel_file =
        tempfile::tempfile_in(&folder).map_err(|e| io("create a file in", &folder, e))?;
    let digest = download(url, &mut wheel_file)?;
    if digest != wheel.sha256 {
        return Err(RuntimeError::Provision(format!(
            "the ONNX Runtime wheel from {url} has sha256 {digest}, not the published {}; nothing \
                was installed (a proxy or mirror altered it?)",
            wheel.sha256
        )));
    }
    let mut archive = zip::ZipArchive::new(wheel_file).map_err(|e| {
        RuntimeError::Provision(format!("the wheel from {url} is not a zip archive: {e}"))
    })?;
    let mut member = archive.by_name(wheel.member).map_err(|e| {
        RuntimeError::Provision(format!(
            "the wheel from {url} has no `{}`: {e}",
            wheel.member
        ))
    })?;
    let mut staged =
        tempfile::NamedTempFile::new_in(&folder).map_err(|e| io("create a file in", &folder, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buffer).map_err(|e| {
            RuntimeError::Provision(format!("cannot unpack `{}` from {url}: {e}", wheel.member))
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        staged
            .write_all(&buffer[..n])
            .map_err(|e| io("write", staged.path(), e))?;
    }
    let library_digest = hex(&hasher.finalize());
    if library_digest != wheel.library_sha256 {
        return Err(RuntimeError::Provision(format!(
            "`{}` in the wheel has sha256 {library_digest}, not {}; nothing was installed",
            wheel.member, wheel.library_sha256
        )));
    }
    install(staged, &path)?;
    Ok(path)
}

/// Puts a fully written temporary file in place as `path`: synced, readable
/// by every user of a shared cache folder (a temporary file is 0600), and
/// renamed over in one step.
pub(crate) fn install(
    mut staged: tempfile::NamedTempFile,
    path: &Path,
) -> Result<(), RuntimeError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        RuntimeError::Provision(format!("cannot {what} `{}`: {e}", p.display()))
    };
    staged
        .as_file_mut()
        .flush()
        .and_then(|()| staged.as_file().sync_all())
        .map_err(|e| io("write", staged.path(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = staged
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    staged
        .persist(path)
        .map_err(|e| io("install", path, e.error))?;
    Ok(())
}

/// Streams `url` into `file`; returns the sha256 of what came.
fn download(url: &str, file: &mut std::fs::File) -> Result<String, RuntimeError> {
    let mut hasher = Sha256::new();
    stream(url, file, |chunk| hasher.update(chunk)).map_err(|e| {
        RuntimeError::Provision(format!(
            "cannot fetch ONNX Runtime {VERSION} from {url}: {e}\n  offline? install ONNX Runtime \
                {VERSION} (its library is in the PyPI wheel at onnxruntime/capi/) and set \
                `ORT_DYLIB_PATH` to it"
        ))
    })?;
    Ok(hex(&hasher.finalize()))
}

/// Streams `url` into `file`, each chunk also to `seen` (a digest); the
/// error says what failed, in words.
pub(crate) fn stream(
    url: &str,
    file: &mut std::fs::File,
    mut seen: impl FnMut(&[u8]),
) -> Result<(), String> {
    let agent = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(std::time::Duration::from_secs(30))
        .build();
    let response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => format!("HTTP status {code}"),
        ureq::Error::Transport(t) => format!(
            "{}{}",
            t.kind(),
            t.message().map(|m| format!(": {m}")).unwrap_or_default()
        ),
    })?;
    let mut reader = response.into_reader();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        seen(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(|e| e.to_string())?;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The process-wide ONNX Runtime environment (the library loads once).
pub fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    static ENV: OnceLock<Result<(ort::environment::Environment, Library), String>> =
        OnceLock::new();
    let result = ENV.get_or_init(|| {
        let library = library().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&library.path).map_err(|e| {
            RuntimeError::Load {
                path: library.path.clone(),
                message: e.to_string(),
            }
            .to_string()
        })?;
        let env = builder
            .with_name("symb")
            .with_telemetry(false)
            .build()
            .map_err(|e| {
                RuntimeError::Load {
                    path: library.path.clone(),
                    message: e.to_string(),
                }
                .to_string()
            })?;
        Ok((env, library))
    });
    match result {
        Ok((env, _)) => Ok(env),
        Err(message) => Err(RuntimeError::Provision(message.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_wheel_names_one_library_and_digests_are_hex() {
        for wheel in &WHEELS {
            assert!(
                wheel.url.ends_with(".whl") && wheel.url.contains(VERSION),
                "{}",
                wheel.url
            );
            assert!(wheel.member.starts_with("onnxruntime/capi/"));
            for digest in [wheel.sha256, wheel.library_sha256] {
                assert_eq!(digest.len(), 64);
                assert!(
                    digest
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                );
            }
        }
    }
}
