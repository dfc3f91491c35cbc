//! `phi master-key`, run as the built binary: a key generated into a
//! private new file, split into share files, rebuilt from every K of them
//! (and refused from fewer, from a damaged share, from shares of two
//! splits), and checked against the KEK check value stored in each backend
//! enabled by cargo features (SQLite in a temporary file; MariaDB and
//! PostgreSQL at `PHI_TEST_MYSQL_URL` / `PHI_TEST_POSTGRES_URL`) and, with
//! `aws-kms`, against a KMS key on moto (`PHI_TEST_KMS_URL`).
#![cfg(feature = "sqlite")]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use phi::{KeyBytes, Keyring, LocalKek};

/// Runs `phi` in `dir` with `args`, nothing of the caller's environment
/// that names a key, KEK or database; `stdin` fed if given.
fn phi_in(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phi"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove("PHI_MASTER_KEY")
        .env_remove("PHI_MASTER_KEY_FILE")
        .env_remove("PHI_KEK")
        .env_remove("PHI_KEK_ID")
        .env_remove("DATABASE_URL")
        .env_remove("PHI_TABLES")
        .env("RUST_BACKTRACE", "0");
    for (name, value) in env {
        command.env(name, value);
    }
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("phi runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("phi ends");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "phi {args:?} panicked"
    );
    out
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn read_key(path: &Path) -> KeyBytes {
    phi::master_key::read_key_file(path).expect("a key file")
}

/// Generates a key file `name` in `dir`.
fn generate(dir: &Path, name: &str) -> PathBuf {
    let out = phi_in(dir, &["master-key", "generate", "--out", name], &[], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    dir.join(name)
}

/// Splits the key file into `dir/out_dir`; the share files, by id.
fn split(dir: &Path, key: &Path, k: u8, n: u8, out_dir: &str) -> Vec<PathBuf> {
    let out = phi_in(
        dir,
        &[
            "master-key",
            "split",
            "--shares",
            &n.to_string(),
            "--threshold",
            &k.to_string(),
            "--key-file",
            &key.display().to_string(),
            "--out-dir",
            out_dir,
        ],
        &[],
        None,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("into {n} shares")) && text.contains(&format!("any {k} of them")),
        "{text}"
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(out_dir))
        .expect("share directory")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort_by_key(|p| {
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        name.split('-')
            .nth(1)
            .expect("id")
            .parse::<u8>()
            .expect("id")
    });
    assert_eq!(files.len(), usize::from(n));
    files
}

/// Every `k`-subset of `0..n`.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![Vec::new()];
    }
    if n < k {
        return Vec::new();
    }
    let mut with_last = subsets(n - 1, k - 1);
    for s in &mut with_last {
        s.push(n - 1);
    }
    let mut all = subsets(n - 1, k);
    all.extend(with_last);
    all
}

fn arg(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn generate_writes_a_private_new_file_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = generate(dir.path(), "master.key");
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    let text = std::fs::read_to_string(&key).expect("read");
    assert_eq!(text.len(), 45, "44 base64 characters and a newline");
    // What PHI_MASTER_KEY_FILE reads.
    LocalKek::from_file("local-1", &key).expect("LocalKek reads it");
    let before = read_key(&key);

    let out = phi_in(
        dir.path(),
        &["master-key", "generate", "--out", "master.key"],
        &[],
        None,
    );
    assert_eq!(code(&out), 3, "refused");
    assert!(
        stderr(&out).contains("master.key exists: refusing to replace it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read_key(&key).expose(), before.expose(), "unchanged");

    // Standard output a pipe: the key, in the file's form.
    let out = phi_in(dir.path(), &["master-key", "generate"], &[], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let printed = stdout(&out);
    assert_eq!(printed.len(), 45);
    phi::master_key::decode(&printed).expect("a key");
    assert_ne!(printed, text, "a new key each time");

    // Standard output a file others may read: refused, nothing written.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let open = dir.path().join("open.key");
        let file = std::fs::File::create(&open).expect("create");
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let out = Command::new(env!("CARGO_BIN_EXE_phi"))
            .args(["master-key", "generate"])
            .stdout(Stdio::from(file))
            .stderr(Stdio::piped())
            .output()
            .expect("phi runs");
        assert_eq!(out.status.code(), Some(3));
        assert!(
            stderr(&out).contains("group or others may read (mode 644)"),
            "{}",
            stderr(&out)
        );
        assert_eq!(std::fs::metadata(&open).expect("stat").len(), 0);
    }

    // A JSON report would share standard output with the key: refused.
    let out = phi_in(
        dir.path(),
        &["master-key", "generate", "--format", "json"],
        &[],
        None,
    );
    assert_eq!(code(&out), 3);
    assert!(out.stdout.is_empty());
    let out = phi_in(
        dir.path(),
        &[
            "master-key",
            "generate",
            "--out",
            "json.key",
            "--format",
            "json",
        ],
        &[],
        None,
    );
    assert_eq!(code(&out), 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["command"], "master-key generate");
    assert_eq!(report["out"], "json.key");
}

#[test]
fn every_three_of_five_share_files_rebuild_the_key_and_two_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = generate(dir.path(), "master.key");
    let master = read_key(&key);
    let files = split(dir.path(), &key, 3, 5, "shares");
    for file in &files {
        #[cfg(unix)]
        assert_eq!(mode(file), 0o600, "{}", file.display());
        let text = std::fs::read_to_string(file).expect("share file");
        assert!(text.starts_with("# phi master key share "), "{text}");
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("phi-share-v1:"))
                .count(),
            1
        );
    }
    let all = subsets(5, 3);
    assert_eq!(all.len(), 10);
    for (n, subset) in all.iter().enumerate() {
        let out_name = format!("rebuilt-{n}.key");
        let mut args = vec![
            "master-key".to_owned(),
            "combine".to_owned(),
            "--out".to_owned(),
            out_name.clone(),
        ];
        args.extend(subset.iter().map(|&i| arg(&files[i])));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = phi_in(dir.path(), &args, &[], None);
        assert_eq!(code(&out), 0, "{subset:?}: {}", stderr(&out));
        let ids: Vec<String> = subset.iter().map(|i| (i + 1).to_string()).collect();
        assert!(
            stdout(&out).contains(&format!("from shares {} of split", ids.join(", "))),
            "{}",
            stdout(&out)
        );
        let rebuilt = dir.path().join(&out_name);
        #[cfg(unix)]
        assert_eq!(mode(&rebuilt), 0o600);
        assert_eq!(read_key(&rebuilt).expose(), master.expose(), "{subset:?}");
    }

    // From standard input, in any order, with the comments.
    let piped: String = [4usize, 0, 2]
        .iter()
        .map(|&i| std::fs::read_to_string(&files[i]).expect("read"))
        .collect();
    let out = phi_in(dir.path(), &["master-key", "combine"], &[], Some(&piped));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        phi::master_key::decode(&stdout(&out))
            .expect("key")
            .expose(),
        master.expose()
    );

    // Every pair: too few, nothing written.
    for subset in subsets(5, 2) {
        let mut args = vec!["master-key", "combine", "--out", "few.key"];
        let names: Vec<String> = subset.iter().map(|&i| arg(&files[i])).collect();
        args.extend(names.iter().map(String::as_str));
        let out = phi_in(dir.path(), &args, &[], None);
        assert_eq!(code(&out), 1);
        assert!(
            stderr(&out).contains("2 share(s) of split")
                && stderr(&out).contains("it needs 3, any 3 of its 5"),
            "{}",
            stderr(&out)
        );
        assert!(!dir.path().join("few.key").exists());
    }

    // Rebuilding over an existing file: refused, the file unchanged.
    let out = phi_in(
        dir.path(),
        &[
            "master-key",
            "combine",
            "--out",
            "master.key",
            &arg(&files[0]),
            &arg(&files[1]),
            &arg(&files[2]),
        ],
        &[],
        None,
    );
    assert_eq!(code(&out), 3);
    assert_eq!(read_key(&key).expose(), master.expose());
}

#[test]
fn damaged_duplicated_and_mixed_shares_are_refused_naming_the_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = generate(dir.path(), "master.key");
    let files = split(dir.path(), &key, 2, 3, "a");
    let others = split(dir.path(), &key, 2, 3, "b");
    let combine = |args: &[&str]| {
        let mut all = vec!["master-key", "combine", "--out", "out.key"];
        all.extend_from_slice(args);
        let out = phi_in(dir.path(), &all, &[], None);
        assert!(!dir.path().join("out.key").exists(), "nothing written");
        (code(&out), stderr(&out))
    };

    // Each field of a share changed by one character.
    let text = std::fs::read_to_string(&files[0]).expect("read");
    let line = text
        .lines()
        .find(|l| l.starts_with("phi-share-v1:"))
        .expect("share line")
        .to_owned();
    for field in 1..=7 {
        let mut fields: Vec<String> = line.split(':').map(str::to_owned).collect();
        let last = fields[field].pop().expect("char");
        fields[field].push(match last {
            '9' => '8',
            'f' => 'e',
            c if c.is_ascii_digit() || ('a'..='e').contains(&c) => {
                char::from(u8::try_from(u32::from(c) + 1).expect("ascii"))
            }
            c => c,
        });
        let damaged = dir.path().join(format!("damaged-{field}.txt"));
        std::fs::write(&damaged, format!("# damaged\n{}\n", fields.join(":"))).expect("write");
        let (status, err) = combine(&[&arg(&damaged), &arg(&files[1])]);
        assert_eq!(status, 1, "field {field}: {err}");
        assert!(
            err.contains(&format!("damaged-{field}.txt line 2")),
            "field {field}: {err}"
        );
        assert!(
            err.contains("checksum does not match") || err.contains("not a phi-share-v1"),
            "field {field}: {err}"
        );
        let value = line.split(':').nth(6).expect("value");
        assert!(!err.contains(&value[..12]), "{err}");
    }

    let (status, err) = combine(&[&arg(&files[0]), &arg(&files[0])]);
    assert_eq!(status, 1);
    assert!(
        err.contains("share 1 of split") && err.contains("given twice"),
        "{err}"
    );

    let (status, err) = combine(&[&arg(&files[0]), &arg(&others[1])]);
    assert_eq!(status, 1);
    assert!(
        err.contains("shares of two splits cannot be combined")
            && err.contains(&arg(&files[0]))
            && err.contains(&arg(&others[1])),
        "{err}"
    );

    let (status, err) = combine(&[]);
    // Standard input is empty (null).
    assert_eq!(status, 1);
    assert!(err.contains("no share given"), "{err}");

    let (status, err) = combine(&["no-such-file.txt"]);
    assert_eq!(status, 1);
    assert!(err.contains("no-such-file.txt"), "{err}");

    // Splitting needs a sensible threshold.
    let out = phi_in(
        dir.path(),
        &[
            "master-key",
            "split",
            "--shares",
            "3",
            "--threshold",
            "4",
            "--key-file",
            "master.key",
            "--out-dir",
            "c",
        ],
        &[],
        None,
    );
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("at least as many shares as the threshold"));
}

// ---------------------------------------------------------------------------
// verify, against each backend.

/// The check value of a local KEK with a unique id stored in `store` (by
/// building a keyring, as an application does); the KEK id.
fn store_local_check(store: Arc<dyn phi::KeyStore>, key: &KeyBytes) -> String {
    let id = common::unique_owner("mk-kek");
    Keyring::builder(store, Arc::new(LocalKek::new(&id, key)))
        .build()
        .expect("keyring stores the check value");
    id
}

/// `verify` with a key file, shares, another key, an unknown KEK id,
/// against the key store `store` opens at `database_url`.
fn verify_on(store: &dyn Fn() -> Arc<dyn phi::KeyStore>, database_url: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = generate(dir.path(), "master.key");
    let master = read_key(&key);
    let kek_id = store_local_check(store(), &master);
    let files = split(dir.path(), &key, 3, 5, "shares");
    let wrong = generate(dir.path(), "wrong.key");
    let wrong_files = split(dir.path(), &wrong, 2, 2, "wrong-shares");
    let db = [("DATABASE_URL", database_url)];
    let verify = |args: &[&str], stdin: Option<&str>| {
        let mut all = vec!["master-key", "verify", "--kek-id", &kek_id];
        all.extend_from_slice(args);
        phi_in(dir.path(), &all, &db, stdin)
    };

    let out = verify(&["--key-file", "master.key"], None);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "VERIFIED: the master key from master.key matches the check value stored for KEK {kek_id} (local-hmac-v1)"
        )),
        "{}",
        stdout(&out)
    );
    // From PHI_MASTER_KEY_FILE, as the application reads it.
    let out = phi_in(
        dir.path(),
        &["master-key", "verify", "--kek", &format!("local:{kek_id}")],
        &[
            ("DATABASE_URL", database_url),
            ("PHI_MASTER_KEY_FILE", "master.key"),
        ],
        None,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let out = verify(
        &[
            "--shares",
            &arg(&files[4]),
            &arg(&files[1]),
            &arg(&files[2]),
        ],
        None,
    );
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("from shares 5, 2, 3 of split"),
        "{}",
        stdout(&out)
    );
    let piped = std::fs::read_to_string(&files[0]).expect("read")
        + &std::fs::read_to_string(&files[3]).expect("read")
        + &std::fs::read_to_string(&files[2]).expect("read");
    let out = verify(&["--shares", "-"], Some(&piped));
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let out = verify(&["--key-file", "wrong.key"], None);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("NOT VERIFIED: the master key from wrong.key does not match"),
        "{}",
        stdout(&out)
    );
    let out = verify(
        &["--shares", &arg(&wrong_files[0]), &arg(&wrong_files[1])],
        None,
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));

    // Too few shares: an error, not a verdict.
    let out = verify(&["--shares", &arg(&files[0]), &arg(&files[1])], None);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("it needs 3"), "{}", stderr(&out));

    // No check value under this id: not verified, and nothing written.
    let unknown = common::unique_owner("mk-unknown");
    let out = phi_in(
        dir.path(),
        &[
            "master-key",
            "verify",
            "--kek-id",
            &unknown,
            "--key-file",
            "master.key",
        ],
        &db,
        None,
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("no check value is stored for KEK {unknown}")),
        "{}",
        stdout(&out)
    );
    assert!(
        store().kek_check(&unknown).expect("read").is_none(),
        "verify wrote nothing"
    );

    // JSON.
    let out = verify(&["--key-file", "master.key", "--format", "json"], None);
    assert_eq!(code(&out), 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["command"], "master-key verify");
    assert_eq!(report["kek_id"], kek_id.as_str());
    assert_eq!(report["matches"], true);
    assert_eq!(report["check_value"], "local-hmac-v1");
}

#[test]
fn verify_against_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keys.db").display().to_string();
    let store = || -> Arc<dyn phi::KeyStore> {
        Arc::new(
            phi::DieselKeyStore::<diesel::SqliteConnection>::builder(&path)
                .run_migrations(true)
                .connect()
                .expect("store"),
        )
    };
    verify_on(&store, &format!("sqlite://{path}"));
    // A database that does not exist is not created.
    let missing = dir.path().join("missing.db");
    let out = phi_in(
        dir.path(),
        &["master-key", "verify"],
        &[
            ("DATABASE_URL", &missing.display().to_string()),
            ("PHI_MASTER_KEY", common::MASTER_KEY_B64),
        ],
        None,
    );
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("no SQLite database at"),
        "{}",
        stderr(&out)
    );
    assert!(!missing.exists());
}

#[cfg(feature = "mysql")]
#[test]
fn verify_against_mysql() {
    let url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let store = || -> Arc<dyn phi::KeyStore> {
        Arc::new(
            phi::DieselKeyStore::<diesel::MysqlConnection>::builder(&url)
                .run_migrations(true)
                .connect()
                .expect("store"),
        )
    };
    verify_on(&store, &url);
}

#[cfg(feature = "postgres")]
#[test]
fn verify_against_postgres() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = || -> Arc<dyn phi::KeyStore> {
        Arc::new(
            phi::DieselKeyStore::<diesel::PgConnection>::builder(&url)
                .run_migrations(true)
                .connect()
                .expect("store"),
        )
    };
    verify_on(&store, &url);
}

/// With `--kek aws-kms:KEY`: the KMS key (or alias) decrypts the canary
/// stored for its KEK id, or does not.
#[cfg(feature = "aws-kms")]
#[test]
fn verify_a_kms_kek_against_moto() {
    use aws_config::BehaviorVersion;
    use aws_sdk_kms::config::{Credentials, Region};
    use phi::{KeyEncryptionKey as _, KeyStore as _};

    const REGION: &str = "us-east-1";
    let url = std::env::var("PHI_TEST_KMS_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = aws_sdk_kms::Client::from_conf(
        aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&url)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build(),
    );
    let create_key = || {
        runtime
            .block_on(
                client
                    .create_key()
                    .description("phi master-key verify")
                    .send(),
            )
            .unwrap_or_else(|e| panic!("no KMS-compatible server at {url} (PHI_TEST_KMS_URL): {e}"))
            .key_metadata()
            .expect("metadata")
            .key_id()
            .to_owned()
    };
    let (a, b, c) = (create_key(), create_key(), create_key());
    let alias = format!("alias/{}", common::unique_owner("mk-verify"));
    runtime
        .block_on(
            client
                .create_alias()
                .alias_name(&alias)
                .target_key_id(&a)
                .send(),
        )
        .expect("CreateAlias");

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("keys.db").display().to_string();
    let store = Arc::new(
        phi::DieselKeyStore::<diesel::SqliteConnection>::builder(&db)
            .run_migrations(true)
            .connect()
            .expect("store"),
    );
    let kek = |key: &str| {
        Arc::new(
            phi::AwsKmsKek::builder(key)
                .region(REGION)
                .endpoint_url(&url)
                .static_credentials("test", "test")
                .build()
                .expect("kek"),
        )
    };
    // The canaries, stored as a keyring stores them on first use.
    for key in [a.as_str(), alias.as_str()] {
        Keyring::builder(store.clone(), kek(key))
            .build()
            .expect("keyring stores the canary");
    }
    // Under key b's id, a canary altered by one bit.
    let mut altered = kek(&a).check_value().expect("canary");
    let last = altered.value.len() - 1;
    altered.value[last] ^= 1;
    assert!(
        store
            .insert_kek_check_if_absent(&format!("aws-kms:{b}"), &altered)
            .expect("insert")
    );

    let verify = |key: &str| {
        phi_in(
            dir.path(),
            &["master-key", "verify", "--kek", &format!("aws-kms:{key}")],
            &[
                ("DATABASE_URL", db.as_str()),
                ("AWS_REGION", REGION),
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_ENDPOINT_URL", url.as_str()),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ],
            None,
        )
    };
    for key in [a.as_str(), alias.as_str()] {
        let out = verify(key);
        assert_eq!(code(&out), 0, "{key}: {}{}", stdout(&out), stderr(&out));
        assert!(
            stdout(&out).contains(&format!(
                "VERIFIED: KMS key {key} decrypts the canary stored for KEK aws-kms:{key} (kms-canary-v1)"
            )),
            "{}",
            stdout(&out)
        );
    }
    let out = verify(&b);
    assert_eq!(code(&out), 4, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("NOT VERIFIED"), "{}", stdout(&out));
    let out = verify(&c);
    assert_eq!(code(&out), 4, "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!("no check value is stored for KEK aws-kms:{c}")),
        "{}",
        stdout(&out)
    );
    // The alias moved to another key: its canary no longer decrypts.
    runtime
        .block_on(
            client
                .update_alias()
                .alias_name(&alias)
                .target_key_id(&c)
                .send(),
        )
        .expect("UpdateAlias");
    let out = verify(&alias);
    assert_eq!(code(&out), 4, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("NOT VERIFIED"), "{}", stdout(&out));
    // A key file with a KMS KEK: refused as meaningless.
    let out = phi_in(
        dir.path(),
        &[
            "master-key",
            "verify",
            "--kek",
            &format!("aws-kms:{a}"),
            "--key-file",
            "x.key",
        ],
        &[("DATABASE_URL", db.as_str())],
        None,
    );
    assert_eq!(code(&out), 1);
}
