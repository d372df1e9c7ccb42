//! docs/COMPATIBILITY.md names the tests that show each entry: every name
//! it gives must exist, and every end-to-end test and call check must be
//! named there, so the matrix and the tests cannot drift apart.

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().parent().unwrap()
}

/// (file or asset, test or check name) pairs.
type Names = BTreeSet<(String, String)>;

/// Backquoted words of the document that look like `file::test` or
/// `asset:check` references.
fn references(doc: &str) -> (Names, Names) {
    let mut tests = BTreeSet::new();
    let mut checks = BTreeSet::new();
    let quoted = doc.lines().flat_map(|line| line.split('`').skip(1).step_by(2));
    for part in quoted {
        let word = |w: &str| {
            !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_*".contains(c))
        };
        if let Some((file, name)) = part.split_once("::") {
            if word(file) && word(name) {
                tests.insert((file.to_string(), name.to_string()));
            }
        } else if let Some((asset, name)) = part.split_once(':') {
            if ["calls", "signals"].contains(&asset) && word(name) {
                checks.insert((asset.to_string(), name.to_string()));
            }
        }
    }
    (tests, checks)
}

/// `#[test] fn NAME` in an e2e test file.
fn test_names(file: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("crates/e2e/tests").join(format!("{file}.rs"))).unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut after_attr = false;
    for line in text.lines().map(str::trim) {
        if line == "#[test]" {
            after_attr = true;
        } else if after_attr {
            if let Some(rest) = line.strip_prefix("fn ") {
                names.insert(rest.split('(').next().unwrap().to_string());
            }
            after_attr = false;
        }
    }
    names
}

/// The names a C asset's `CHECK(NAME, ...)` calls print: the string
/// literals of the first argument (`CHECK("a", ...)`, or `CHECK(i ? "a" :
/// "b", ...)`).
fn check_names(asset: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("crates/e2e/assets").join(format!("{asset}.c"))).unwrap();
    let mut names = BTreeSet::new();
    for call in text.split("CHECK(").skip(2) {
        // (The first piece is the text before the macro's definition.)
        let first_arg = &call[..call.find("\",").map_or(0, |end| end + 1)];
        names.extend(first_arg.split('"').skip(1).step_by(2).map(str::to_string));
    }
    names
}

#[test]
fn every_reference_exists_and_every_test_is_referenced() {
    let doc = std::fs::read_to_string(root().join("docs/COMPATIBILITY.md")).unwrap();
    assert!(check_names("calls").len() > 50 && check_names("signals").len() > 10, "cannot read the checks");
    let (tests, checks) = references(&doc);
    let mut problems = Vec::new();
    for (file, name) in &tests {
        if name != "*" && !test_names(file).contains(name) {
            problems.push(format!("COMPATIBILITY.md names {file}::{name}, which is not a test"));
        }
    }
    for (asset, name) in &checks {
        if !name.ends_with('*') && !check_names(asset).contains(name) {
            problems.push(format!("COMPATIBILITY.md names {asset}:{name}, which is not a check in {asset}.c"));
        }
    }
    // The other way round: the end-to-end tests of programs and calls, and
    // every check of the call assets.
    let files =
        ["addresses", "calls", "fabric", "fork", "iperf3", "isolation", "programs", "redis", "servers", "signals"];
    for file in files {
        assert!(!test_names(file).is_empty(), "no tests found in {file}.rs");
        for name in test_names(file) {
            let named =
                tests.contains(&(file.to_string(), name.clone())) || tests.contains(&(file.to_string(), "*".into()));
            if !named {
                problems.push(format!("{file}::{name} is not in COMPATIBILITY.md"));
            }
        }
    }
    for asset in ["calls", "signals"] {
        for name in check_names(asset) {
            let named = checks.contains(&(asset.to_string(), name.clone()))
                || checks
                    .iter()
                    .any(|(a, n)| a == asset && n.ends_with('*') && name.starts_with(n.trim_end_matches('*')));
            if !named {
                problems.push(format!("{asset}:{name} is not in COMPATIBILITY.md"));
            }
        }
    }
    assert!(problems.is_empty(), "docs/COMPATIBILITY.md and the tests disagree:\n{}", problems.join("\n"));
}
