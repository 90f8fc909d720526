//! The documentation stays a front door and a set of rooms that exist: the README is short,
//! every relative link in it and in `docs/` leads to a file (and heading) that exists, and
//! nothing in the repository points at files outside it, which a reader of the repository
//! alone could not open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The README is read first by everyone: past this it stops being readable in five minutes.
/// 20 KB taken strictly (20,000 bytes, not 20 KiB), as `wc -c README.md` counts.
const README_MAX_BYTES: usize = 20_000;

/// What lies outside the repository and must not be cited: the team's private notes and bench
/// folder. Built from pieces so this file does not match itself.
fn forbidden() -> [String; 3] {
    [
        ["REDIS", "-NOTES"].concat(),
        ["..", "/shared"].concat(),
        ["shared", "/bench"].concat(),
    ]
}

/// The markdown files whose links are checked: the README and everything in `docs/`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![Path::new(ROOT).join("README.md")];
    let docs = fs::read_dir(Path::new(ROOT).join("docs")).expect("docs/ exists");
    let mut docs: Vec<PathBuf> = docs
        .map(|entry| entry.expect("readable docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines outside fenced code blocks, numbered from 1: where links and headings live.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut lines = Vec::new();
    let mut fenced = false;
    for (index, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            lines.push((index + 1, line));
        }
    }
    lines
}

/// Replaces the content of each inline code span with `x`, keeping the backticks: a `](` inside
/// code is not a link, while link text that is code (`` [`Dockerfile`](Dockerfile) ``) stays a
/// link.
fn blank_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        // The closing run has the same length; without one the backticks are literal.
        let mut close = None;
        let mut j = i + run;
        while j < chars.len() {
            if chars[j] == '`' {
                let other = chars[j..].iter().take_while(|c| **c == '`').count();
                if other == run {
                    close = Some(j);
                    break;
                }
                j += other;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                let ticks = "`".repeat(run);
                out.push_str(&ticks);
                out.push('x');
                out.push_str(&ticks);
                i = j + run;
            }
            None => {
                out.push_str(&"`".repeat(run));
                i += run;
            }
        }
    }
    out
}

/// The targets of the inline links `[text](target)` on a line of prose.
fn link_targets(line: &str) -> Vec<String> {
    let line = blank_code_spans(line);
    let mut targets = Vec::new();
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        // A title after the target ("path \"title\"") is not part of it.
        let target = after[..end].split_whitespace().next().unwrap_or_default();
        targets.push(target.trim_matches(['<', '>']).to_owned());
        rest = &after[end..];
    }
    targets
}

/// The anchors GitHub gives the headings of the markdown file at `path`: the heading's text
/// in lower case, punctuation (backticks included) dropped, spaces as hyphens, and a repeated
/// heading numbered.
fn anchors_of(path: &Path) -> HashSet<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut seen = HashSet::new();
    for (_, line) in prose(&text) {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let slug: String = line[hashes..]
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while seen.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        seen.insert(unique);
    }
    seen
}

#[test]
fn the_readme_is_at_most_20_kb() {
    let size = fs::metadata(Path::new(ROOT).join("README.md"))
        .expect("README.md exists")
        .len();
    assert!(
        size <= README_MAX_BYTES as u64,
        "README.md is {size} bytes, more than {README_MAX_BYTES}: move detail into docs/"
    );
}

#[test]
fn every_relative_link_leads_to_a_file_and_heading_that_exist() {
    let root = Path::new(ROOT);
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = fs::read_to_string(&file).expect("readable markdown");
        let dir = file.parent().expect("a file has a folder");
        let name = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (number, line) in prose(&text) {
            for target in link_targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((path, anchor)) => (path, Some(anchor)),
                    None => (target.as_str(), None),
                };
                let linked = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                let relative = normalize(&linked)
                    .strip_prefix(root)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| linked.display().to_string());
                if !linked.exists() {
                    broken.push(format!("{name}:{number}: {target}: no file {relative}"));
                    continue;
                }
                if let Some(anchor) = anchor.filter(|a| !a.is_empty()) {
                    let is_markdown = linked.extension().is_some_and(|ext| ext == "md");
                    if is_markdown && !anchors_of(&linked).contains(anchor) {
                        broken.push(format!(
                            "{name}:{number}: {target}: no heading #{anchor} in {relative}"
                        ));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// `a/b/../c` as `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_docs_page_is_linked_from_the_readme() {
    let readme = fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let linked: HashSet<String> = prose(&readme)
        .into_iter()
        .flat_map(|(_, line)| link_targets(line))
        .map(|target| target.split('#').next().unwrap_or_default().to_owned())
        .collect();
    let orphans: Vec<String> = markdown_files()
        .iter()
        .skip(1)
        .filter_map(|file| {
            let relative = file.strip_prefix(ROOT).ok()?.display().to_string();
            (!linked.contains(&relative)).then_some(relative)
        })
        .collect();
    assert!(orphans.is_empty(), "not linked from README.md: {orphans:?}");
}

/// Every file under `path` (or `path` itself), leaving out build output and what the fuzzer
/// generates, which git ignores.
fn files_under(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_owned());
        return;
    }
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let skipped = path.is_dir()
            && path.file_name().is_some_and(|name| {
                matches!(
                    name.to_str(),
                    Some("target" | "corpus" | "artifacts" | "coverage")
                )
            });
        if !skipped {
            files_under(&path, out);
        }
    }
}

#[test]
fn nothing_points_outside_the_repository() {
    let root = Path::new(ROOT);
    let mut files = Vec::new();
    for place in [
        "README.md",
        "docs",
        "src",
        "tests",
        "benches",
        "config",
        ".ci",
        "fuzz",
        "Dockerfile",
    ] {
        files_under(&root.join(place), &mut files);
    }
    assert!(
        files.len() > 50,
        "only {} files found: is ROOT right?",
        files.len()
    );
    let forbidden = forbidden();
    let mut found = Vec::new();
    for file in files {
        let Ok(bytes) = fs::read(&file) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        for needle in &forbidden {
            for (number, line) in text.lines().enumerate() {
                if line.contains(needle.as_str()) {
                    let name = file.strip_prefix(root).unwrap_or(&file).display();
                    found.push(format!("{name}:{}: {needle}", number + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "references to files outside the repository (cite Redis's own docs or source, or \
         benches/):\n{}",
        found.join("\n")
    );
}

/// docs/ARCHITECTURE.md names the code as it is: every source file appears in its module map,
/// and every `dir/file.rs` it names (in the map or in a request's walk) exists under `src/`.
#[test]
fn the_architecture_page_matches_the_source_tree() {
    let page = fs::read_to_string(Path::new(ROOT).join("docs/ARCHITECTURE.md")).unwrap();
    let map = page
        .split("## Module map")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("a module map in a code block");
    let mut sources = Vec::new();
    files_under(&Path::new(ROOT).join("src"), &mut sources);
    let words: HashSet<&str> = map
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .collect();
    let unmapped: Vec<String> = sources
        .iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            (!words.contains(name)).then(|| path.display().to_string())
        })
        .collect();
    assert!(unmapped.is_empty(), "not in the module map: {unmapped:?}");
    let missing: Vec<&str> = page
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| span.ends_with(".rs") && span.contains('/') && !span.contains(' '))
        .filter(|span| {
            let path = span.strip_prefix("src/").unwrap_or(span);
            !Path::new(ROOT).join("src").join(path).exists()
        })
        .collect();
    assert!(missing.is_empty(), "named but not in src/: {missing:?}");
}
