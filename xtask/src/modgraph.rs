//! `cargo xtask modules`: the import graph between the top-level modules
//! of each crate, and its cycles.
//!
//! A module imports another when its code (tests left out) names it
//! through `crate::` (or `super::` from a submodule), or names an item the
//! crate root re-exports from it (`pub use daemon::Daemon` makes
//! `crate::Daemon` an import of `daemon`). Text only: it reads the source
//! as written, so it sees what a reader sees.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module name → the modules it imports.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The crates whose module graphs must stay acyclic.
pub const CHECKED: &[&str] = &["crates/daemon/src", "crates/preload/src", "crates/policy/src"];

/// The import graph of the crate whose sources are under `src`.
pub fn graph(src: &Path) -> std::io::Result<Graph> {
    let mut files: BTreeMap<String, Vec<(PathBuf, Vec<String>)>> = BTreeMap::new();
    collect(src, src, &mut files)?;
    let root = ["lib.rs", "main.rs"].iter().map(|f| src.join(f)).find(|p| p.exists());
    let reexports = match root {
        Some(root) => reexports(&strip(&std::fs::read_to_string(root)?)),
        None => BTreeMap::new(),
    };
    let names: BTreeSet<String> = files.keys().cloned().collect();
    let mut graph = Graph::new();
    for (module, paths) in &files {
        let edges = graph.entry(module.clone()).or_default();
        for (path, parts) in paths {
            let text = strip(&std::fs::read_to_string(path)?);
            for name in references(&text, parts) {
                let target = if names.contains(&name) { Some(name) } else { reexports.get(&name).cloned() };
                if let Some(target) = target.filter(|t| t != module) {
                    edges.insert(target);
                }
            }
        }
    }
    Ok(graph)
}

/// Every `.rs` file under `dir`, by its top-level module (the crate root
/// and binaries left out), with its path below `src` in parts.
fn collect(src: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<(PathBuf, Vec<String>)>>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                collect(src, &path, out)?;
            }
            continue;
        }
        let Some(rel) = path.strip_prefix(src).ok().and_then(|r| r.to_str()) else { continue };
        let Some(rel) = rel.strip_suffix(".rs") else { continue };
        let parts: Vec<String> = rel.split('/').map(String::from).collect();
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        out.entry(parts[0].clone()).or_default().push((path.clone(), parts));
    }
    Ok(())
}

/// `text` without comments and without `#[cfg(test)] mod ... { }` blocks.
fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else if rest.starts_with('"') {
            // A string literal: kept out, so that text in it is no import.
            let end = string_end(rest);
            out.push_str("\"\"");
            rest = &rest[end..];
        } else {
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    drop_test_modules(&out)
}

/// The length of the string literal `s` starts with (escapes honoured).
fn string_end(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

fn drop_test_modules(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if !trimmed.starts_with("mod ") {
            out.push_str("#[cfg(test)]");
            rest = after;
            continue;
        }
        let Some(open) = after.find('{') else { return out };
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Names the root re-exports: `pub use module::Item;` and
/// `pub use module::{A, B};` map each item to its module.
fn reexports(root: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for statement in root.split(';') {
        let Some(path) = statement.trim().strip_prefix("pub use ") else { continue };
        let Some((module, items)) = path.split_once("::") else { continue };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let item = item.split(" as ").last().unwrap_or("").trim();
            if !item.is_empty() {
                map.insert(item.to_string(), module.trim().to_string());
            }
        }
    }
    map
}

/// The first path segments `text` names through `crate::` (also inside
/// `crate::{..}` groups) or, from a file below its top-level module,
/// through the `super::` that reaches the crate root.
fn references(text: &str, parts: &[String]) -> BTreeSet<String> {
    // How many `super::` reach the crate root from this file.
    let depth = parts.len() - usize::from(parts.last().is_some_and(|p| p == "mod"));
    let supers = "super::".repeat(depth);
    let mut found = BTreeSet::new();
    for prefix in ["crate::".to_string(), supers] {
        let mut rest = text;
        while let Some(at) = rest.find(&prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').map_or(group.len(), |i| i);
                // Nested groups close early; their heads were read before.
                for item in group[..end].split(',') {
                    found.extend(head(item.trim()));
                }
            } else {
                found.extend(head(rest));
            }
        }
    }
    found
}

/// The identifier `s` starts with.
fn head(s: &str) -> Option<String> {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    (end > 0).then(|| s[..end].to_string())
}

/// The strongly connected sets of more than one module: each is a cycle.
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Modules that can reach each other, found by reachability sets (the
    // graphs are a few dozen modules).
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = graph.get(from).into_iter().flatten().collect();
        while let Some(m) = todo.pop() {
            if seen.insert(m.clone()) {
                todo.extend(graph.get(m).into_iter().flatten());
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in graph.keys() {
        if done.contains(m) || !reaches[m].contains(m) {
            continue;
        }
        let set: Vec<String> =
            graph.keys().filter(|n| reaches[m].contains(*n) && reaches[*n].contains(m)).cloned().collect();
        done.extend(set.iter().cloned());
        out.push(set);
    }
    out
}

/// Prints each checked crate's graph and cycles; fails if there is a cycle.
pub fn run() -> crate::Result {
    let mut found = 0;
    for src in CHECKED {
        let graph = graph(&crate::root().join(src)).map_err(|e| format!("{src}: {e}"))?;
        println!("{src}:");
        for (module, imports) in &graph {
            let list: Vec<&str> = imports.iter().map(String::as_str).collect();
            println!("  {module} -> {}", if list.is_empty() { "(nothing)".into() } else { list.join(", ") });
        }
        for cycle in cycles(&graph) {
            found += 1;
            println!("  CYCLE: {}", cycle.join(" -> "));
        }
    }
    if found > 0 {
        return Err(format!("{found} import cycles"));
    }
    println!("no import cycles");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(list: &[(&str, &[&str])]) -> Graph {
        list.iter().map(|(m, to)| (m.to_string(), to.iter().map(|t| t.to_string()).collect())).collect()
    }

    #[test]
    fn cycles_are_the_modules_that_reach_each_other() {
        let g = edges(&[("a", &["b"]), ("b", &["c"]), ("c", &["a", "d"]), ("d", &[]), ("e", &["e2"]), ("e2", &["e"])]);
        assert_eq!(cycles(&g), [vec!["a", "b", "c"], vec!["e", "e2"]]);
        assert!(cycles(&edges(&[("a", &["b"]), ("b", &[])])).is_empty());
    }

    #[test]
    fn imports_are_read_from_paths_groups_supers_and_reexports() {
        let text = strip(
            "use crate::{ids::Pair, sync::lock};\nuse crate::Daemon;\n// crate::comment\n\
             let s = \"crate::string\";\nsuper::super::fabric::Meter;\n\
             #[cfg(test)]\nmod tests { use crate::testonly; }\n",
        );
        let parts = vec!["attach".to_string(), "namespace".to_string()];
        let got = references(&text, &parts);
        let want: BTreeSet<String> = ["ids", "sync", "Daemon", "fabric"].iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want);
        let roots = reexports("pub use daemon::Daemon;\npub use x::{A, B as C};\nuse y::D;");
        assert_eq!(roots.get("Daemon").map(String::as_str), Some("daemon"));
        assert_eq!(roots.get("C").map(String::as_str), Some("x"));
        assert!(!roots.contains_key("D"));
    }

    #[test]
    fn the_checked_crates_have_no_import_cycles() {
        for src in CHECKED {
            let graph = graph(&crate::root().join(src)).unwrap();
            assert!(graph.len() > 3, "{src}: modules found");
            assert_eq!(cycles(&graph), Vec::<Vec<String>>::new(), "{src}: import cycles");
        }
    }
}
