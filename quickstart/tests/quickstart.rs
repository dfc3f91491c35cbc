//! The quick start runs as README.md says, and README.md shows it as it is.

use std::path::Path;
use std::process::Command;

/// The program README.md's quick start shows: its first `rust` block
/// after "## Quick start".
fn readme_quick_start() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md is readable");
    let start = readme
        .find("## Quick start")
        .expect("README.md has a Quick start section");
    let code = &readme[start..];
    let open = code
        .find("```rust")
        .expect("the Quick start has a rust block");
    let code = &code[open..];
    let body = &code[code.find('\n').expect("a fence line") + 1..];
    body[..body.find("```\n").expect("the rust block is closed")].to_string()
}

#[test]
fn readme_shows_the_quick_start_as_compiled() {
    let main = include_str!("../src/main.rs");
    let from_use = &main[main.find("use ").expect("main.rs has a use line")..];
    assert_eq!(
        readme_quick_start(),
        from_use,
        "README.md's quick start differs from quickstart/src/main.rs: copy one onto the other"
    );
}

fn run(dir: &Path, master_key: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .current_dir(dir)
        .env("PHI_MASTER_KEY", master_key)
        .env_remove("PHI_MASTER_KEY_FILE")
        .output()
        .expect("the quick start runs")
}

#[test]
fn the_quick_start_runs_twice_and_stores_no_plaintext() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    for n in 1..=2 {
        let out = run(dir.path(), key);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {n}: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!(
                "note {n}: \"Jane Doe, born 1980-01-15\", found by its body: {n}"
            )),
            "run {n}: {stdout}"
        );
        assert!(
            stdout.contains("[f1, 01,"),
            "run {n}: an envelope v1 is stored: {stdout}"
        );
    }
    // The database and its journal files, if any are left.
    for entry in std::fs::read_dir(dir.path()).expect("the directory") {
        let path = entry.expect("an entry").path();
        let bytes = std::fs::read(&path).expect("a database file");
        assert!(
            !bytes.windows(8).any(|w| w == b"Jane Doe"),
            "{} holds the plaintext",
            path.display()
        );
    }

    // Another master key: refused by the KEK check, nothing written.
    let other = run(dir.path(), "HyAeHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=");
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("local-1"),
        "the error names the KEK id: {stderr}"
    );
}
