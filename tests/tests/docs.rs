//! The repository documents itself: every relative link of its Markdown pages resolves
//! (file and heading), nothing points outside the repository, and the configuration
//! reference in `deploy/README.md` lists exactly the environment variables the two
//! binaries accept (as their `--help` prints them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// Folders that are not the repository's own text: build output, local state, the
/// fuzzer's corpus and build, git's store.
const SKIP: [&str; 5] = ["target", ".local", ".git", "corpus", "node_modules"];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !SKIP.contains(&name) && name != ".schemathesis" {
                files(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

fn markdown_files() -> Vec<PathBuf> {
    let mut all = Vec::new();
    files(&root(), &mut all);
    all.retain(|p| p.extension().is_some_and(|e| e == "md"));
    assert!(
        all.len() >= 6,
        "expected the README and the pages beside each part, found {all:?}"
    );
    all
}

/// `[text](target)` links of a Markdown text, outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        // Drop code spans, so `a](b)` inside backticks is not a link.
        let mut plain = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                plain.push(c);
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_block = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
        } else if !in_block && line.starts_with('#') {
            let heading = line.trim_start_matches('#').replace('`', "");
            out.insert(slug(&heading));
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_markdown_pages_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in markdown_files() {
        let text = std::fs::read_to_string(&page).expect("read page");
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                page.clone()
            } else {
                page.parent().expect("page folder").join(path)
            };
            let Ok(target) = target.canonicalize() else {
                broken.push(format!("{}: {link} (no such file)", page.display()));
                continue;
            };
            if !target.starts_with(root()) {
                broken.push(format!(
                    "{}: {link} (outside the repository)",
                    page.display()
                ));
                continue;
            }
            if let Some(anchor) = anchor {
                let text = std::fs::read_to_string(&target).unwrap_or_default();
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{}: {link} (no such heading)", page.display()));
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} relative links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn nothing_in_the_repository_points_outside_it() {
    let root = root().canonicalize().expect("root");
    // An absolute path to what lies beside the checkout names a sibling of it.
    let parent = root.parent().map(|p| format!("{}/", p.display()));
    let mut all = Vec::new();
    files(&root, &mut all);
    let mut found = Vec::new();
    for path in all {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // not text
        };
        let dir = path.parent().unwrap_or(&root).to_path_buf();
        for (n, line) in text.lines().enumerate() {
            let mut why = Vec::new();
            // Built from parts, so this file does not match itself.
            if line.contains(concat!("..", "/shared/")) || line.contains(concat!("SPEC", ".md")) {
                why.push("the working documents".to_owned());
            }
            for token in path_tokens(line).filter(|t| t.contains("../")) {
                let start = token.find("../").unwrap_or(0);
                if !stays_inside(&dir, &token[start..], &root) {
                    why.push(format!("{token} leaves the repository"));
                }
            }
            if let Some(parent) = parent.as_deref().filter(|p| *p != "/") {
                for token in path_tokens(line).filter(|t| t.starts_with(parent)) {
                    // Names something that is there beside the checkout (not just any
                    // path under the same directory, e.g. /tmp when cloned under /tmp).
                    let first = token[parent.len()..].split('/').next().unwrap_or("");
                    let beside = !first.is_empty()
                        && Some(std::ffi::OsStr::new(first)) != root.file_name()
                        && Path::new(parent).join(first).exists();
                    if beside {
                        why.push(format!("{token} is beside the repository"));
                    }
                }
            }
            if !why.is_empty() {
                found.push(format!(
                    "{}:{}: {}: {line}",
                    path.display(),
                    n + 1,
                    why.join("; ")
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "references outside the repository:\n{}",
        found.join("\n")
    );
}

/// The path-like words of a line (letters, digits and `._/-`).
fn path_tokens(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c)))
        .filter(|t| !t.is_empty())
}

/// Whether `relative`, read from `dir`, names a place inside `root` (resolved by its
/// words, without touching the file system).
fn stays_inside(dir: &Path, relative: &str, root: &Path) -> bool {
    let mut at: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                at.pop();
            }
            p => at.push(p.to_owned()),
        }
    }
    let resolved: PathBuf = at.iter().collect();
    resolved.starts_with(root)
}

#[test]
fn a_path_that_leaves_the_repository_is_seen() {
    let root = Path::new("/r/repo");
    assert!(stays_inside(
        Path::new("/r/repo/deploy/local"),
        "../../README.md",
        root
    ));
    assert!(!stays_inside(
        Path::new("/r/repo/deploy"),
        "../../elsewhere/notes.md",
        root
    ));
    assert!(!stays_inside(Path::new("/r/repo"), "../x", root));
    let tokens: Vec<&str> = path_tokens("see [x](../../a/b.md) and `cd ../..`").collect();
    assert_eq!(tokens, ["see", "x", "../../a/b.md", "and", "cd", "../.."]);
}

/// The environment variables a binary accepts, as its `--help` lists them.
fn accepted(binary: &str) -> BTreeSet<String> {
    let out = Command::new(e2e::bin(binary))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{binary} --help failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let vars: BTreeSet<String> = text
        .split("[env: ")
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    assert!(vars.len() >= 10, "{binary} --help lists only {vars:?}");
    vars
}

/// Every `INGEST_…` / `CONSUMER_…` name in the "Configuration" section of deploy/README.md.
fn documented() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("deploy/README.md")).expect("deploy/README.md");
    let start = text
        .find("\n## Configuration")
        .expect("deploy/README.md has a Configuration section");
    let section = &text[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut out = BTreeSet::new();
    for prefix in ["INGEST_", "CONSUMER_"] {
        let mut rest = section;
        while let Some(i) = rest.find(prefix) {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            out.insert(name);
        }
    }
    out
}

#[test]
fn the_configuration_reference_lists_exactly_what_the_binaries_accept() {
    let accepted: BTreeSet<String> = accepted("ingest")
        .into_iter()
        .chain(accepted("consumer"))
        .collect();
    let documented = documented();
    let undocumented: Vec<_> = accepted.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        undocumented.is_empty(),
        "accepted but missing from deploy/README.md's Configuration: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "in deploy/README.md's Configuration but accepted by neither binary: {unknown:?}"
    );
}

#[test]
fn slugs_and_links_are_read_as_github_does() {
    assert_eq!(
        slug(" Analytics in ClickHouse, dashboards in Grafana"),
        "analytics-in-clickhouse-dashboards-in-grafana"
    );
    assert_eq!(
        slug("Answers: one envelope, HTTP status = code"),
        "answers-one-envelope-http-status--code"
    );
    assert_eq!(
        links("see [a](x.md#y) and `[b](not-a-link)` and [c](../z)"),
        vec!["x.md#y", "../z"]
    );
}
