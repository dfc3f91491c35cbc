//! A fleet of real processes on every backend: two `fleet_node` examples
//! following the key-event feed, changed by the `phi` CLI. A shred, a
//! roll-out change and a fleet-wide clear made by one process reach the
//! others within the feed interval plus one second. A process killed inside
//! a change's transaction leaves neither the change nor its event; one
//! killed right after its commit leaves both, and the fleet follows. Waits
//! are on observable answers with a deadline, never fixed sleeps.

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
        Node::start_with(url, policy, INTERVAL, &[])
    }

    /// A node that stops at `pause` (`inside` or `committed`) in its first
    /// life-cycle change: see examples/fleet_node.rs.
    fn start_paused(url: &str, policy: &str, pause: &str) -> Node {
        Node::start_with(url, policy, INTERVAL, &[("FLEET_NODE_PAUSE", pause)])
    }

    fn start_with(url: &str, policy: &str, interval: Duration, env: &[(&str, &str)]) -> Node {
        let mut child = Command::new(common::example_bin("fleet_node"))
            .args([url, &interval.as_millis().to_string(), policy])
            .envs(env.iter().copied())
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
        self.until_within(command, want, since, BOUND)
    }

    /// Asks `command` until the answer is `want`, at most `bound` after
    /// `since`; the time it took.
    fn until_within(
        &mut self,
        command: &str,
        want: &str,
        since: Instant,
        bound: Duration,
    ) -> Duration {
        loop {
            let answer = self.ask(command);
            if answer == want {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < bound,
                "{command}: still {answer:?} after {:?}",
                since.elapsed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Node {
    /// SIGKILLs the node: no destructor, no rollback of its own, no goodbye
    /// to the database.
    fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
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

/// A unique roll-out policy name for one test (the column holds 64).
fn policy_name(prefix: &str) -> String {
    let policy = common::unique_owner(prefix);
    policy[policy.len().saturating_sub(60)..].to_owned()
}

/// A process killed inside the transaction of a shred and of a roll-out
/// change loses both the change and its event; a follower stays as it was,
/// and the same change made again by another process reaches it.
fn killed_inside(url: &str) {
    let policy = &policy_name("fleet-kill");
    let owner = common::unique_owner("fleet-kill-in");
    let other = common::unique_owner("fleet-kill-other");
    let mut follower = Node::start(url, policy);
    assert_eq!(
        follower.ask(&format!("seal {owner}")),
        format!("sealed {owner} v1")
    );
    let head = follower.number("head");

    // The shred: killed after taking the feed's next id, before its commit.
    let mut victim = Node::start_paused(url, policy, "inside");
    assert_eq!(victim.ask(&format!("shred {owner}")), "paused inside");
    victim.kill();
    assert_eq!(
        follower.ask(&format!("events {head} {owner}")),
        "events 0",
        "no event without its change"
    );
    let mut fresh = Node::start(url, policy);
    assert_eq!(
        fresh.ask(&format!("seal {owner}")),
        format!("sealed {owner} v1"),
        "no change without its event: the key is still there"
    );
    let follower_sync = Instant::now();
    while follower.number("position") < head {
        assert!(
            follower_sync.elapsed() < BOUND,
            "the follower stopped reading"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        follower.ask(&format!("seal {owner}")),
        format!("sealed {owner} v1")
    );

    // The roll-out change: the same.
    let mut victim = Node::start_paused(url, policy, "inside");
    assert_eq!(victim.ask(&format!("rollout {owner}")), "paused inside");
    victim.kill();
    assert_eq!(
        follower.ask(&format!("policy-events {head}")),
        "policy-events 0"
    );
    assert_eq!(
        fresh.ask(&format!("encrypts {other}")),
        format!("encrypts {other} true")
    );
    assert_eq!(
        follower.ask(&format!("encrypts {other}")),
        format!("encrypts {other} true")
    );

    // Made again by another process, each change reaches the follower.
    let again = Instant::now();
    assert_eq!(
        fresh.ask(&format!("shred {owner}")),
        format!("shredded {owner} 1")
    );
    let took = follower.until(
        &format!("seal {owner}"),
        &format!("refused {owner}: shredded"),
        again,
    );
    eprintln!("the repeated shred reached the follower in {took:?}");
    let again = Instant::now();
    let answer = fresh.ask(&format!("rollout {owner}"));
    assert!(
        answer.starts_with(&format!("rollout {owner} head ")),
        "{answer}"
    );
    follower.until(
        &format!("encrypts {other}"),
        &format!("encrypts {other} false"),
        again,
    );
    assert_eq!(follower.ask(&format!("events {head} {owner}")), "events 1");
    assert_eq!(
        follower.ask(&format!("policy-events {head}")),
        "policy-events 1"
    );
}

/// A process killed right after the commit of a shred leaves the change
/// and its event, and the follower applies it.
fn killed_after_commit(url: &str) {
    let policy = &policy_name("fleet-kill");
    let owner = common::unique_owner("fleet-kill-after");
    let mut follower = Node::start(url, policy);
    assert_eq!(
        follower.ask(&format!("seal {owner}")),
        format!("sealed {owner} v1")
    );
    let head = follower.number("head");
    let mut victim = Node::start_paused(url, policy, "committed");
    let shred_at = Instant::now();
    assert_eq!(victim.ask(&format!("shred {owner}")), "paused committed");
    victim.kill();
    assert_eq!(
        follower.ask(&format!("events {head} {owner}")),
        "events 1",
        "the event is in the feed"
    );
    let took = follower.until(
        &format!("seal {owner}"),
        &format!("refused {owner}: shredded"),
        shred_at,
    );
    eprintln!("the killed process's shred reached the follower in {took:?}");
    let mut fresh = Node::start(url, policy);
    assert_eq!(
        fresh.ask(&format!("seal {owner}")),
        format!("refused {owner}: shredded")
    );
}

#[cfg(feature = "sqlite")]
#[test]
fn a_process_killed_mid_change_loses_no_event_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("fleet.db").display().to_string();
    killed_inside(&url);
    killed_after_commit(&url);
}

#[cfg(feature = "mysql")]
#[test]
fn a_process_killed_mid_change_loses_no_event_on_mysql() {
    killed_inside(&mysql_url());
    killed_after_commit(&mysql_url());
}

#[cfg(feature = "postgres")]
#[test]
fn a_process_killed_mid_change_loses_no_event_on_postgres() {
    killed_inside(&postgres_url());
    killed_after_commit(&postgres_url());
}

/// PostgreSQL only, by nature: `LISTEN`/`NOTIFY` is PostgreSQL's. With a
/// feed interval of a minute, a shred in one process is refused by another
/// well within five seconds: the append's `NOTIFY`, delivered at its
/// commit, wakes the other's follower at once.
#[cfg(feature = "postgres")]
#[test]
fn notify_wakes_a_follower_long_before_its_interval_on_postgres() {
    const LONG: Duration = Duration::from_secs(60);
    let url = postgres_url();
    let policy = &policy_name("fleet-notify");
    let owner = common::unique_owner("fleet-notify");
    let mut follower = Node::start_with(&url, policy, LONG, &[]);
    let mut shredder = Node::start_with(&url, policy, LONG, &[]);
    assert_eq!(
        follower.ask(&format!("seal {owner}")),
        format!("sealed {owner} v1")
    );
    let shred_at = Instant::now();
    assert_eq!(
        shredder.ask(&format!("shred {owner}")),
        format!("shredded {owner} 1")
    );
    let took = follower.until_within(
        &format!("seal {owner}"),
        &format!("refused {owner}: shredded"),
        shred_at,
        Duration::from_secs(5),
    );
    eprintln!("NOTIFY: the shred reached the other process in {took:?}");
    assert!(took < LONG / 2);
}

/// `phi keys status` lists a following process by `host:pid`, at or past
/// the last event it was sent.
fn readers_in_status(url: &str) {
    let policy = &policy_name("fleet-readers");
    let owner = common::unique_owner("fleet-readers");
    let mut node = Node::start(url, policy);
    let pid = node.child.id();
    let answer = node.ask(&format!("clear {owner}"));
    let id: i64 = answer
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{answer}"));
    let since = Instant::now();
    loop {
        let out = phi(url, policy, &["keys", "status"]);
        let line = out.lines().find(|l| {
            l.trim_start()
                .split("  ")
                .next()
                .is_some_and(|r| r.ends_with(&format!(":{pid}")))
        });
        let position = line.and_then(|l| {
            l.split(" at #")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse::<i64>().ok())
        });
        if position.is_some_and(|p| p >= id) {
            assert!(out.contains("Key-event feed: head #"), "{out}");
            assert!(
                line.is_some_and(|l| l.contains("behind), recorded ")),
                "{out}"
            );
            break;
        }
        assert!(
            since.elapsed() < BOUND * 3,
            "no reader :{pid} at #{id}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(feature = "sqlite")]
#[test]
fn keys_status_shows_each_readers_position_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    readers_in_status(&dir.path().join("fleet.db").display().to_string());
}

#[cfg(feature = "mysql")]
#[test]
fn keys_status_shows_each_readers_position_on_mysql() {
    readers_in_status(&mysql_url());
}

#[cfg(feature = "postgres")]
#[test]
fn keys_status_shows_each_readers_position_on_postgres() {
    readers_in_status(&postgres_url());
}

#[cfg(feature = "mysql")]
fn mysql_url() -> String {
    std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

#[cfg(feature = "postgres")]
fn postgres_url() -> String {
    std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
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
    fleet(&mysql_url());
}

#[cfg(feature = "postgres")]
#[test]
fn a_fleet_follows_the_feed_on_postgres() {
    fleet(&postgres_url());
}
