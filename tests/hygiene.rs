//! The repository is self-contained: no tracked file names a path outside it.
//!
//! A newcomer's clone has nothing beside it, so a test, bench, doc or source
//! file that reads `../something` or an absolute path of the machine it was
//! written on works only there. This scans every tracked text file for
//! - the absolute path of the repository's parent folder, or of `$HOME`;
//! - relative paths with `..` that, taken from the file's own folder or from
//!   the repository root (where `CARGO_MANIFEST_DIR`-joined paths start),
//!   leave the repository and name something that exists.
//!
//! The second rule checks existence so that the path-traversal strings the
//! tests send on purpose (`../etc/passwd`, `../elsewhere`) do not count,
//! while a real reach outside, such as a fixture folder beside the clone, does.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Every file git tracks (or, outside a git checkout, every file but build
/// outputs and installed packages), relative to `root`.
fn tracked_files(root: &Path) -> Vec<PathBuf> {
    let listed = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z"])
        .output();
    match listed {
        Ok(out) if out.status.success() => out
            .stdout
            .split(|b| *b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| PathBuf::from(String::from_utf8_lossy(name).into_owned()))
            .collect(),
        _ => {
            let mut files = Vec::new();
            walk(root, Path::new(""), &mut files);
            files.sort();
            files
        }
    }
}

fn walk(root: &Path, relative: &Path, files: &mut Vec<PathBuf>) {
    const SKIPPED: [&str; 6] = [
        ".git",
        "target",
        "node_modules",
        "dist",
        "cache",
        "__pycache__",
    ];
    let Ok(entries) = std::fs::read_dir(root.join(relative)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let path = relative.join(&name);
        match entry.file_type() {
            Ok(kind) if kind.is_dir() && !SKIPPED.iter().any(|s| name == *s) => {
                walk(root, &path, files)
            }
            Ok(kind) if kind.is_file() => files.push(path),
            _ => {}
        }
    }
}

/// `base.join(relative)` with `.` and `..` resolved lexically (no symlinks).
fn normalize(base: &Path, relative: &str) -> PathBuf {
    let mut out = base.to_path_buf();
    for component in Path::new(relative).components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The path-like words of `text` that climb with `..` and then name
/// something (a bare `..` is Rust's range syntax, or the repository root
/// seen from a subfolder).
fn climbing_paths(text: &str) -> impl Iterator<Item = &str> {
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_' | '-');
    text.split(move |c: char| !is_path_char(c)).filter(|word| {
        let components: Vec<Component> = Path::new(word).components().collect();
        components
            .iter()
            .rposition(|c| *c == Component::ParentDir)
            .is_some_and(|last| {
                components[last + 1..]
                    .iter()
                    .any(|c| matches!(c, Component::Normal(_)))
            })
    })
}

/// The system's own folders, which path-traversal tests aim at on purpose
/// (`../etc/passwd` reaches `/etc/passwd` from a clone at the top of the disk).
const SYSTEM: [&str; 4] = ["/etc", "/proc", "/sys", "/dev"];

/// What in `relative` (a file of `root`) names a path outside `root`.
fn outside_references(
    root: &Path,
    relative: &Path,
    text: &str,
    forbidden_prefixes: &[String],
) -> Vec<String> {
    let mut found: Vec<String> = forbidden_prefixes
        .iter()
        .filter(|prefix| text.contains(prefix.as_str()))
        .map(|prefix| format!("the absolute path `{prefix}`"))
        .collect();
    let folder = root.join(relative).parent().unwrap_or(root).to_path_buf();
    for word in climbing_paths(text) {
        let word_from_root = word.trim_start_matches('/');
        let escapes = [normalize(&folder, word), normalize(root, word_from_root)]
            .into_iter()
            .find(|target| {
                !target.starts_with(root)
                    && !SYSTEM.iter().any(|system| target.starts_with(system))
                    && target.exists()
            });
        if let Some(target) = escapes {
            found.push(format!("`{word}`, which is `{}`", target.display()));
        }
    }
    found
}

/// Absolute paths no tracked file may contain: the folder the repository sits
/// in (so the repository's own absolute path too), and the home folder.
fn forbidden_prefixes(root: &Path) -> Vec<String> {
    let mut prefixes = Vec::new();
    if let Some(parent) = root.parent().filter(|p| p.parent().is_some()) {
        prefixes.push(format!("{}/", parent.display()));
    }
    if let Some(home) = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.parent().is_some())
    {
        prefixes.push(format!("{}/", home.display()));
    }
    prefixes
}

fn scan(root: &Path) -> Vec<String> {
    let prefixes = forbidden_prefixes(root);
    let mut problems = Vec::new();
    for relative in tracked_files(root) {
        let Ok(bytes) = std::fs::read(root.join(&relative)) else {
            continue;
        };
        if bytes.iter().take(8192).any(|b| *b == 0) {
            continue; // binary: weights, tensors
        }
        let text = String::from_utf8_lossy(&bytes);
        for problem in outside_references(root, &relative, &text, &prefixes) {
            problems.push(format!("{}: {problem}", relative.display()));
        }
    }
    problems
}

#[test]
fn no_tracked_file_names_a_path_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .expect("the repository exists");
    let files = tracked_files(&root);
    assert!(
        files.len() > 50,
        "only {} files found under {}",
        files.len(),
        root.display()
    );
    let problems = scan(&root);
    assert!(
        problems.is_empty(),
        "tracked files reach outside the repository (copy what they need into it):\n{}",
        problems.join("\n")
    );
}

/// The scan itself: it finds a fixture folder beside the repository, by a
/// relative path from the file's folder or from the root, and an absolute one;
/// it lets traversal strings that name nothing pass.
#[test]
fn the_scan_finds_paths_that_leave_the_repository() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("repo");
    std::fs::create_dir_all(root.join("tests")).unwrap();
    std::fs::create_dir_all(outer.path().join("sibling-of-the-repo/fixtures")).unwrap();
    std::fs::write(
        outer.path().join("sibling-of-the-repo/fixtures/x.json"),
        "{}",
    )
    .unwrap();
    std::fs::write(
        root.join("tests/a.rs"),
        r#"PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sibling-of-the-repo/fixtures")"#,
    )
    .unwrap();
    std::fs::write(
        root.join("tests/b.rs"),
        r#"concat!(env!("CARGO_MANIFEST_DIR"), "/../sibling-of-the-repo/fixtures/x.json")"#,
    )
    .unwrap();
    std::fs::write(
        root.join("tests/c.rs"),
        r#"include_str!("../../sibling-of-the-repo/fixtures")"#,
    )
    .unwrap();
    std::fs::write(
        root.join("tests/d.rs"),
        format!(
            "open(\"{}/sibling-of-the-repo/fixtures\")",
            outer.path().display()
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("tests/ok.rs"),
        r#"get("/../etc/passwd"); edit("../elsewhere"); include_str!("../README.md"); "a ... b""#,
    )
    .unwrap();
    let problems = scan(&root);
    let flagged: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        flagged,
        ["tests/a.rs", "tests/b.rs", "tests/c.rs", "tests/d.rs"],
        "{problems:#?}"
    );
}
