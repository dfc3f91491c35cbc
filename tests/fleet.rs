//! A fleet of real processes on every backend: two `fleet_node` examples
//! following the key-event feed, changed by the `phi` CLI. A shred, a
//! roll-out change and a fleet-wide clear made by one process reach the
//! others within the feed interval plus one second. Waits are on observable
//! answers with a deadline, never fixed sleeps.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The nodes' feed interval: short, for the CI budget.
const INTERVAL: Duration = Duration::from_millis(300);
/// How long a change may take to reach every node.
const BOUND: Duration = Duration::from_millis(300 + 1_000);

struct Node {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Node {
    fn start(url: &str, policy: &str) -> Node {
        let mut child = Command::new(common::example_bin("fleet_node"))
            .args([url, &INTERVAL.as_millis().to_string(), policy])
            .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
            .env("PHI_KEK_ID", "local-test")
            .env_remove("PHI_MASTER_KEY_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("fleet_node starts");
        let input = child.stdin.take().expect("stdin");
        let output = BufReader::new(child.stdout.take().expect("stdout"));
        let mut node = Node {
            child,
            input,
            output,
        };
        let ready = node.line();
        assert!(ready.starts_with("ready "), "{ready}");
        node
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.output.read_line(&mut line).expect("node answers");
        assert!(!line.is_empty(), "the node exited");
        line.trim_end().to_owned()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.input, "{command}").expect("node reads");
        self.input.flush().expect("flush");
        self.line()
    }

    fn number(&mut self, command: &str) -> u64 {
        let answer = self.ask(command);
        answer
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{answer}"))
    }

    /// Asks `command` until the answer is `want`; the time it took.
    fn until(&mut self, command: &str, want: &str, since: Instant) -> Duration {
        loop {
            let answer = self.ask(command);
            if answer == want {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < BOUND,
                "{command}: still {answer:?} after {:?}",
                since.elapsed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn phi(url: &str, policy: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_phi"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
        .env("PHI_KEK_ID", "local-test")
        .env("PHI_FEED_INTERVAL", "0.3")
        .env("PHI_ROLLOUT_POLICY", policy)
        .env_remove("PHI_MASTER_KEY_FILE")
        .env_remove("PHI_TABLES")
        .output()
        .expect("phi runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() || output.status.code() == Some(4),
        "phi {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn fleet(url: &str) {
    let policy = common::unique_owner("fleet");
    let policy = &policy[policy.len().saturating_sub(60)..];
    let shredded = common::unique_owner("fleet-shred");
    let kept = common::unique_owner("fleet-kept");
    let mut nodes = [Node::start(url, policy), Node::start(url, policy)];
    for node in &mut nodes {
        assert_eq!(
            node.ask(&format!("seal {shredded}")),
            format!("sealed {shredded} v1")
        );
        assert_eq!(
            node.ask(&format!("seal {kept}")),
            format!("sealed {kept} v1")
        );
    }

    // A shred by the CLI: every node refuses the owner within the bound.
    let shred_at = Instant::now();
    let out = phi(
        url,
        policy,
        &["keys", "shred", "--owner", &shredded, "--yes"],
    );
    assert!(out.contains("drop this owner's keys by"), "{out}");
    for (i, node) in nodes.iter_mut().enumerate() {
        let took = node.until(
            &format!("seal {shredded}"),
            &format!("refused {shredded}: shredded"),
            shred_at,
        );
        eprintln!("shred reached node {i} in {took:?}");
        assert_eq!(
            node.ask(&format!("seal {kept}")),
            format!("sealed {kept} v1")
        );
    }

    // A roll-out change by the CLI: obeyed within the bound.
    let rollout_at = Instant::now();
    phi(url, policy, &["rollout", "set", "--owner", &kept]);
    for (i, node) in nodes.iter_mut().enumerate() {
        let took = node.until(
            &format!("encrypts {shredded}"),
            &format!("encrypts {shredded} false"),
            rollout_at,
        );
        eprintln!("roll-out reached node {i} in {took:?}");
        assert_eq!(
            node.ask(&format!("encrypts {kept}")),
            format!("encrypts {kept} true")
        );
    }

    // A fleet-wide clear: every node unwraps the owner's key again, once.
    let before: Vec<u64> = nodes.iter_mut().map(|n| n.number("unwraps")).collect();
    let clear_at = Instant::now();
    let out = phi(url, policy, &["clear-cache", "--owner", &kept]);
    let event: u64 = out
        .split("key event #")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    for (i, node) in nodes.iter_mut().enumerate() {
        while node.number("position") < event {
            assert!(
                clear_at.elapsed() < BOUND,
                "node {i} has not read event #{event}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("clear reached node {i} in {:?}", clear_at.elapsed());
        assert_eq!(
            node.ask(&format!("seal {kept}")),
            format!("sealed {kept} v1")
        );
        assert_eq!(
            node.ask(&format!("seal {kept}")),
            format!("sealed {kept} v1")
        );
        assert_eq!(
            node.number("unwraps"),
            before[i] + 1,
            "node {i}: one unwrap after the clear"
        );
    }
}

#[cfg(feature = "sqlite")]
#[test]
fn a_fleet_follows_the_feed_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    fleet(&dir.path().join("fleet.db").display().to_string());
}

#[cfg(feature = "mysql")]
#[test]
fn a_fleet_follows_the_feed_on_mysql() {
    fleet(
        &std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
    );
}

#[cfg(feature = "postgres")]
#[test]
fn a_fleet_follows_the_feed_on_postgres() {
    fleet(
        &std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
    );
}
