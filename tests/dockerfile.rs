//! The Dockerfile's build stage builds from what it copies, and from nothing else: cargo reads
//! every target the manifest declares (the bench target's `benches/resp.rs` too) before it
//! builds any, so a file the stage does not copy stops `docker build`. Checked without Docker:
//! the files and folders the stage's COPY lines name are copied into a folder of their own, as
//! Docker would put them under WORKDIR, and cargo checks the binary there, offline and with the
//! lock file as is (`--locked`, as the stage's build does).
//!
//! `cargo check`, not the stage's `cargo build --release`: it reads the same manifest, targets
//! and lock file, and compiles the same sources, for a fraction of the time. Its target folder
//! is kept under `target/tmp` between runs; measured on a busy 2-core machine: about 85 s the
//! first time (every dependency is checked once), a second or two after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One instruction: its keyword (upper case) and its arguments, continuation lines joined.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            (keyword.to_ascii_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

/// `.dockerignore`'s patterns. Only plain paths are understood (`target`, `fuzz/target`): a
/// pattern with wildcards or an exception would need this test to learn them first.
fn ignored() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap_or_default();
    let patterns: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.trim_matches('/').to_owned())
        .collect();
    for pattern in &patterns {
        assert!(
            !pattern.contains(['*', '?', '[', '!']),
            ".dockerignore pattern {pattern:?}: teach tests/dockerfile.rs about it"
        );
    }
    patterns
}

fn is_ignored(relative: &Path, patterns: &[String]) -> bool {
    patterns.iter().any(|pattern| relative.starts_with(pattern))
}

/// Copies `from` (a file, or a folder's contents, as COPY does) to `to`, leaving out what
/// `.dockerignore` leaves out of the build context. Modification times are kept, so cargo
/// checks again only what changed since the last run.
fn copy(root: &Path, from: &Path, to: &Path, patterns: &[String]) {
    let relative = from.strip_prefix(root).expect("inside the context");
    if is_ignored(relative, patterns) {
        return;
    }
    let meta = std::fs::metadata(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    if meta.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy(root, &entry.path(), &to.join(entry.file_name()), patterns);
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
        let copied = std::fs::File::options().write(true).open(to).unwrap();
        copied.set_modified(meta.modified().unwrap()).unwrap();
    }
}

/// The sources and destination of a COPY (not `--from` another stage), or `None`.
fn copy_arguments(arguments: &str) -> Option<(Vec<&str>, &str)> {
    let words: Vec<&str> = arguments.split_whitespace().collect();
    if words.iter().any(|word| word.starts_with("--from")) {
        return None;
    }
    let words: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
    let (destination, sources) = words.split_last().expect("COPY has arguments");
    Some((sources.to_vec(), destination))
}

#[test]
fn the_build_stage_copies_everything_the_build_needs() {
    let root = Path::new(ROOT);
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let instructions = instructions(&dockerfile);
    let patterns = ignored();
    // Every COPY from the build context names something that is in it: the runtime stage's
    // config file as well.
    for (keyword, arguments) in &instructions {
        if let (true, Some((sources, _))) = (keyword == "COPY", copy_arguments(arguments)) {
            for source in sources {
                let relative = Path::new(source.trim_start_matches("./"));
                assert!(
                    root.join(relative).exists(),
                    "COPY {source}: not in the repository"
                );
                assert!(
                    !is_ignored(relative, &patterns),
                    "COPY {source}: in .dockerignore"
                );
            }
        }
    }

    let start = instructions
        .iter()
        .position(|(keyword, arguments)| keyword == "FROM" && arguments.ends_with(" AS build"))
        .expect("a build stage: FROM ... AS build");
    let stage: Vec<&(String, String)> = instructions[start + 1..]
        .iter()
        .take_while(|(keyword, _)| keyword != "FROM")
        .collect();
    let build = stage
        .iter()
        .find(|(keyword, arguments)| keyword == "RUN" && arguments.contains("cargo build"))
        .expect("the stage runs cargo build");
    assert!(
        build.1.contains("--locked") && build.1.contains("--bin redmux"),
        "{}",
        build.1
    );

    // Where the stage's WORKDIR is, here; the copies land under it.
    let context = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dockerfile-build-stage");
    let _ = std::fs::remove_dir_all(&context);
    let mut workdir = PathBuf::from("/");
    let mut copied = Vec::new();
    for (keyword, arguments) in &stage {
        match keyword.as_str() {
            "WORKDIR" => workdir = workdir.join(arguments),
            "COPY" => {
                let (sources, destination) = copy_arguments(arguments).expect("from the context");
                let destination = workdir.join(destination);
                let destination = destination.strip_prefix("/").unwrap();
                let into_folder = destination.to_string_lossy().ends_with('/') || sources.len() > 1;
                for source in sources {
                    let from = root.join(source.trim_start_matches("./"));
                    let to = if into_folder && from.is_file() {
                        context.join(destination).join(from.file_name().unwrap())
                    } else {
                        context.join(destination)
                    };
                    copy(root, &from, &to, &patterns);
                    copied.push(source.to_owned());
                }
            }
            _ => {}
        }
    }
    let project = context.join(workdir.strip_prefix("/").unwrap());
    assert!(
        project.join("Cargo.toml").is_file(),
        "the stage copies no Cargo.toml into its WORKDIR: {copied:?}"
    );

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dockerfile-target");
    let output = Command::new(cargo)
        .args(["check", "--offline", "--locked", "--bin", "redmux"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "cargo check from only what the build stage copies ({copied:?}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
