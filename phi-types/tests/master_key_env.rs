//! `LocalKek::from_env`: `PHI_MASTER_KEY`, then `PHI_MASTER_KEY_FILE`.
//!
//! The environment is process-wide, so each case runs in a child process
//! (this test binary again, running the ignored `child` test) with its own
//! environment.
#![allow(clippy::print_stdout)]

use std::process::Command;

use phi_types::{KeyBytes, KeyEncryptionKey, LocalKek};

const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_B64: &str = "//////////////////////////////////////////8=";

/// Reads the master key from this process's environment and prints either a
/// key wrapped under it or the error.
#[test]
#[ignore = "run as a child process by master_key_comes_from_the_environment_or_a_file"]
fn child() {
    if std::env::var_os("PHI_ENV_CHILD").is_none() {
        return;
    }
    match LocalKek::from_env("env-kek") {
        Ok(kek) => {
            let wrapped = kek.wrap("u1", 1, &KeyBytes::new([9; 32])).expect("wrap");
            println!("PHI_WRAPPED {}", hex::encode(wrapped));
        }
        Err(error) => println!("PHI_ERROR {error}"),
    }
}

fn run(vars: &[(&str, &str)]) -> String {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            "--exact",
            "child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("PHI_MASTER_KEY")
        .env_remove("PHI_MASTER_KEY_FILE")
        .env("PHI_ENV_CHILD", "1");
    for (k, v) in vars {
        command.env(k, v);
    }
    let out = command.output().expect("child runs");
    assert!(out.status.success(), "child failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for marker in ["PHI_WRAPPED ", "PHI_ERROR "] {
        if let Some((_, rest)) = stdout.split_once(marker) {
            let value = rest.lines().next().unwrap_or_default();
            return format!("{marker}{value}");
        }
    }
    panic!("child printed no result: {stdout}");
}

fn unwraps_under(result: &str, key_b64: &str) -> bool {
    let Some(hex) = result.strip_prefix("PHI_WRAPPED ") else {
        return false;
    };
    let wrapped = hex::decode(hex.trim()).expect("hex");
    let kek = LocalKek::from_base64("env-kek", key_b64).expect("key");
    kek.unwrap("u1", 1, &wrapped)
        .is_ok_and(|k| k.expose() == &[9; 32])
}

#[test]
fn master_key_comes_from_the_environment_or_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("master.key");
    std::fs::write(&file, format!("{OTHER_B64}\n")).expect("key file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
            .expect("a private key file");
    }
    let file = file.display().to_string();

    let from_var = run(&[("PHI_MASTER_KEY", KEY_B64)]);
    assert!(unwraps_under(&from_var, KEY_B64), "{from_var}");

    let from_file = run(&[("PHI_MASTER_KEY_FILE", &file)]);
    assert!(unwraps_under(&from_file, OTHER_B64), "{from_file}");

    let both = run(&[("PHI_MASTER_KEY", KEY_B64), ("PHI_MASTER_KEY_FILE", &file)]);
    assert!(
        unwraps_under(&both, KEY_B64),
        "PHI_MASTER_KEY comes first: {both}"
    );

    let neither = run(&[]);
    assert!(
        neither.contains("neither PHI_MASTER_KEY nor PHI_MASTER_KEY_FILE is set"),
        "{neither}"
    );

    let short = run(&[("PHI_MASTER_KEY", "AAAA")]);
    assert!(short.contains("decodes to 3 bytes"), "{short}");
    assert!(
        !short.contains("AAAA"),
        "the key text is never echoed: {short}"
    );

    let missing = run(&[("PHI_MASTER_KEY_FILE", "/nonexistent/master.key")]);
    assert!(missing.contains("/nonexistent/master.key"), "{missing}");
}
