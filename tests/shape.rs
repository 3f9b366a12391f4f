//! The shape of the code: no module of `src/` reaches one that reaches it
//! back (the layers of `lib.rs` hold only if the imports form no cycle), and
//! no stage file reaches into another stage's.
//!
//! A module is a file (`src/engine/executor.rs` is `engine::executor`, a
//! `mod.rs` its folder). Its references are the `crate::…` and `super::…`
//! paths in its code (comments aside), braces expanded, each taken to the
//! longest module it names, and in a folder's `mod.rs` the parts it names
//! bare (`executor::execute`). A part that uses its folder's items
//! (`super::Stage`) does not count: that is how a folder is built.
#![allow(clippy::unwrap_used)] // a test: a panic is how it fails

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// The module a file under `src/` is.
fn module_of(relative: &Path) -> Module {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// `text` without comments: `//` to the end of a line, outside strings.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut escaped = false;
        let mut previous = ' ';
        let mut cut = line.len();
        for (i, c) in line.char_indices() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if c == '"' {
                in_string = true;
            } else if c == '/' && previous == '/' {
                cut = i - 1;
                break;
            }
            previous = c;
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// The paths a piece of code names from `crate` or `super`, as segments
/// (a `use a::{b, c::d}` group gives `a::b` and `a::c::d`).
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let at = from + at;
            from = at + start.len();
            if at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b':') {
                continue;
            }
            let head = &start[..start.len() - 2];
            expand(head, &code[at + start.len()..], &mut found);
        }
    }
    found
}

/// The paths `head::rest…` names, where `rest` is the text after `head::`.
fn expand(head: &str, rest: &str, found: &mut Vec<Vec<String>>) {
    let mut prefix: Vec<String> = head.split("::").map(str::to_string).collect();
    let mut rest = rest;
    loop {
        let ident: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !ident.is_empty() {
            prefix.push(ident.clone());
            rest = &rest[ident.len()..];
            if let Some(after) = rest.strip_prefix("::") {
                rest = after;
                continue;
            }
            found.push(prefix);
            return;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // The group's items, split at top-level commas.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&prefix.join("::"), item.trim(), found);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            if !item.trim().is_empty() {
                expand(&prefix.join("::"), item.trim(), found);
            }
        } else {
            found.push(prefix);
        }
        return;
    }
}

/// Module -> the modules its code names.
fn references(files: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let longest = |path: &[String]| {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| files.contains_key(m))
    };
    // A part using its folder's items (`super::Stage`) is the folder's own
    // structure; the folder using a part's items is a dependency like any.
    let inside = |part: &Module, folder: &Module| part.starts_with(folder);
    let mut edges = BTreeMap::new();
    for (module, text) in files {
        let code = code(text);
        let mut targets = BTreeSet::new();
        // A folder names its parts without `crate::` or `super::`.
        for part in files
            .keys()
            .filter(|p| p.len() == module.len() + 1 && p.starts_with(module))
        {
            let name = format!("{}::", part[module.len()]);
            let named = code.match_indices(&name).any(|(at, _)| {
                at == 0
                    || !code.as_bytes()[at - 1].is_ascii_alphanumeric()
                        && !matches!(code.as_bytes()[at - 1], b'_' | b':')
            });
            if named {
                targets.insert(part.clone());
            }
        }
        for path in paths(&code) {
            // `super` is the module's parent (from a file and from a `mod.rs` alike).
            let ups = path.iter().take_while(|s| *s == "super").count();
            let mut resolved = if ups == 0 {
                Vec::new()
            } else {
                module[..module.len().saturating_sub(ups)].to_vec()
            };
            resolved.extend(path[ups.max(1)..].iter().cloned());
            if let Some(target) = longest(&resolved).filter(|t| t != module && !inside(module, t)) {
                targets.insert(target);
            }
        }
        edges.insert(module.clone(), targets);
    }
    edges
}

/// The cycles among `edges`: each strongly connected set of two or more
/// modules, with the references inside it.
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<String>> {
    let reach = |from: &Module| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for next in edges.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&Module, BTreeSet<Module>> =
        edges.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for module in edges.keys() {
        if done.contains(module) || !reachable[module].contains(module) {
            continue;
        }
        let members: BTreeSet<&Module> = reachable[module]
            .iter()
            .filter(|m| reachable[*m].contains(module))
            .collect();
        let mut lines = Vec::new();
        for a in &members {
            done.insert((*a).clone());
            for b in &edges[*a] {
                if members.contains(b) {
                    lines.push(format!("{} -> {}", a.join("::"), b.join("::")));
                }
            }
        }
        found.push(lines);
    }
    found
}

/// Every `.rs` file under `dir`, relative to it.
fn sources(dir: &Path) -> BTreeMap<Module, String> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(dir).unwrap();
                let module = module_of(relative);
                let text = std::fs::read_to_string(&path).unwrap();
                // `main.rs` and `lib.rs` are both the root.
                files
                    .entry(module)
                    .and_modify(|t: &mut String| t.push_str(&text))
                    .or_insert(text);
            }
        }
    }
    files
}

#[test]
fn no_module_of_src_reaches_one_that_reaches_it_back() {
    let files = sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(files.len() > 40, "{} modules", files.len());
    let found = cycles(&references(&files));
    assert!(
        found.is_empty(),
        "import cycles among src/'s modules:\n{}",
        found
            .iter()
            .map(|c| c.join("\n"))
            .collect::<Vec<_>>()
            .join("\n\n")
    );
}

#[test]
fn no_stage_file_reaches_into_another_stages() {
    let files = sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let stages: Vec<&Module> = files
        .keys()
        .filter(|m| m.len() == 2 && m[0] == "stages" && m[1] != "shared")
        .collect();
    let mut reaches = Vec::new();
    for stage in &stages {
        let text = code(&files[*stage]);
        for other in &stages {
            if other != stage
                && (text.contains(&format!("super::{}::", other[1]))
                    || text.contains(&format!("crate::stages::{}::", other[1])))
            {
                reaches.push(format!("{} -> {}", stage.join("::"), other.join("::")));
            }
        }
    }
    assert!(stages.len() >= 12, "{stages:?}");
    assert!(
        reaches.is_empty(),
        "stage files that reach into another's (put what they share in stages/shared.rs):\n{}",
        reaches.join("\n")
    );
}

/// The checks find what they look for: a cycle between siblings, one made
/// through a `use super::{…}` group, one through a folder's bare use of its
/// part, and none where a part uses its folder's items.
#[test]
fn the_checks_find_cycles_through_paths_and_groups() {
    let module = |s: &str| {
        s.split("::")
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect::<Module>()
    };
    let build = |sources: &[(&str, &str)]| {
        let files: BTreeMap<Module, String> = sources
            .iter()
            .map(|(m, t)| (module(m), t.to_string()))
            .collect();
        cycles(&references(&files))
    };
    let found = build(&[
        ("", ""),
        ("a", "pub use b::X; // crate::a::c::Y"),
        ("a::b", "use super::c::Y;"),
        ("a::c", "fn f() { crate::a::b::X }"),
    ]);
    assert_eq!(
        found,
        vec![vec!["a::b -> a::c".to_string(), "a::c -> a::b".to_string()]]
    );
    let found = build(&[
        ("", ""),
        ("a", ""),
        ("a::b", "use super::{c::Y, d};"),
        ("a::c", "use crate::{a::b::{X}, z};"),
        ("a::d", ""),
    ]);
    assert_eq!(found.len(), 1, "{found:?}");
    let found = build(&[
        ("", ""),
        ("a", "use b::X; fn f() { super::a::b::X }"),
        ("a::b", "use super::Z; use crate::a::Y;"),
        ("a::c", "let s = \"crate::a::b\";"),
    ]);
    assert!(found.is_empty(), "{found:?}");
    // A folder that names a part bare, whose code reaches back through another module.
    let found = build(&[
        ("", ""),
        ("a", "pub use b::X;"),
        ("a::b", "use crate::c::Y;"),
        ("c", "fn f() { crate::a::Z }"),
    ]);
    assert_eq!(
        found,
        vec![vec![
            "a -> a::b".to_string(),
            "a::b -> c".to_string(),
            "c -> a".to_string()
        ]]
    );
}

/// lib.rs lists the modules bottom up: none uses one listed below it.
#[test]
fn each_module_uses_only_those_lib_rs_lists_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(root.join("lib.rs")).unwrap();
    let order: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! - [`"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name.to_string()))
        .collect();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    assert_eq!(
        order.iter().cloned().collect::<BTreeSet<_>>(),
        declared,
        "lib.rs's list names each module once"
    );
    let rank = |m: &Module| {
        m.first()
            .and_then(|top| order.iter().position(|o| o == top))
    };
    let mut upward = Vec::new();
    for (from, targets) in references(&sources(&root)) {
        for to in targets {
            if let (Some(a), Some(b)) = (rank(&from), rank(&to))
                && b > a
            {
                upward.push(format!("{} -> {}", from.join("::"), to.join("::")));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "modules that use one lib.rs lists below them:\n{}",
        upward.join("\n")
    );
}
