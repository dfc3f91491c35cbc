// The admin HTTP API on this backend, every route through tower's
// `oneshot`: what it answers, what it changes in the key store, what it
// audits, and that a request its guard refuses changes nothing. Included by
// `suite/mod.rs` inside `mod admin` (feature `admin-http`).

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use phi::admin::{self, Actor, Guard, Options, Rejection};
use phi::{AuditAction, AuditFilter, AuditRecord, KeyState};
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// Admits `Bearer good-<tag>` as actor `op-<tag>`; refuses `Bearer
/// read-only-<tag>` with 403 (actor `viewer-<tag>`) and anything else with
/// 401. The reason names the request's `x-test` header, so a test finds its
/// own `denied` records on a shared server.
struct TestGuard;

impl Guard for TestGuard {
    async fn admit(&self, request: &Parts) -> Result<Actor, Rejection> {
        let tag = request
            .headers
            .get("x-test")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("untagged")
            .to_owned();
        let token = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match token {
            Some(t) if t == format!("good-{tag}") => Ok(Actor::new(format!("op-{tag}"))),
            Some(t) if t == format!("read-only-{tag}") => Err(Rejection::forbidden(
                Some(&format!("viewer-{tag}")),
                format!("viewer may not change keys ({tag})"),
            )),
            _ => Err(Rejection::unauthorized(format!("no valid token ({tag})"))),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One request through the router: (status, JSON body).
fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    tag: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-test", tag);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .expect("request");
    runtime().block_on(async {
        let response = app.clone().oneshot(request).await.expect("router answers");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {uri}: body is not JSON ({e}): {bytes:?}"));
        (status, body)
    })
}

struct Admin {
    db: TestDb,
    keyring: Keyring,
    app: axum::Router,
    tag: String,
}

impl Admin {
    fn new(tag: &str) -> Admin {
        Admin::with_options(tag, Options::default())
    }

    fn with_options(tag: &str, options: Options) -> Admin {
        Admin::tagged(common::unique_owner(tag), options)
    }

    fn tagged(tag: String, options: Options) -> Admin {
        let db = TestDb::new();
        // A roll-out policy of this test's own: the fleet's is shared.
        let keyring = Keyring::builder(db.store(), common::local_kek())
            .actor("integration-test")
            .rollout_policy(&tag)
            .build()
            .expect("keyring");
        let app = admin::router_with(keyring.clone(), TestGuard, options);
        Admin {
            db,
            keyring,
            app,
            tag,
        }
    }

    fn good(&self) -> String {
        format!("good-{}", self.tag)
    }

    fn actor(&self) -> String {
        format!("op-{}", self.tag)
    }

    fn get(&self, uri: &str) -> (StatusCode, Value) {
        call(&self.app, "GET", uri, &self.tag, Some(&self.good()), None)
    }

    fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        call(&self.app, "POST", uri, &self.tag, Some(&self.good()), Some(body))
    }

    fn audit(&self, owner: &str) -> Vec<AuditRecord> {
        let mut filter = AuditFilter::new(1_000);
        filter.owner = Some(owner.to_owned());
        self.db.store().audit_page(&filter).expect("audit")
    }

    /// This test's `admin` records (owner `*` or given), newest first.
    fn admin_records(&self, owner: &str) -> Vec<AuditRecord> {
        self.audit(owner)
            .into_iter()
            .filter(|r| r.event.action == AuditAction::Admin && r.event.actor == self.actor())
            .collect()
    }

    fn denied_records(&self) -> Vec<AuditRecord> {
        let mut filter = AuditFilter::new(1_000);
        filter.action = Some(AuditAction::Denied);
        self.db
            .store()
            .audit_page(&filter)
            .expect("audit")
            .into_iter()
            .filter(|r| r.event.detail.as_deref().is_some_and(|d| d.contains(&self.tag)))
            .collect()
    }

    /// Another process's keyring: follows the feed, read by hand
    /// (`sync_feed`) so the test decides when.
    fn follower(&self) -> Keyring {
        Keyring::builder(self.db.store(), common::local_kek())
            .actor("integration-test-follower")
            .rollout_policy(&self.tag)
            .feed_interval(std::time::Duration::from_secs(3_600))
            .build()
            .expect("following keyring")
    }

    fn key_states(&self, owner: &str) -> Vec<(u32, KeyState)> {
        let mut rows = self.db.store().load_keys(&[owner]).expect("keys");
        rows.sort_by_key(|r| r.version);
        rows.into_iter().map(|r| (r.version, r.state)).collect()
    }
}

fn owners_table(db: &TestDb, table: &str, owners: &[&str]) {
    let mut conn = db.conn();
    diesel::sql_query(format!(
        "CREATE TABLE IF NOT EXISTS {table} (owner_id VARCHAR(255) NOT NULL)"
    ))
    .execute(&mut conn)
    .expect("owners table");
    for owner in owners {
        diesel::sql_query(format!("INSERT INTO {table} (owner_id) VALUES ('{owner}')"))
            .execute(&mut conn)
            .expect("owner row");
    }
}

#[test]
fn key_status_reports_one_owner_coverage_keys_by_kek_and_cache_stats() {
    // Owner ids are unique to this run: on a shared server the table holds
    // earlier runs' owners too, and the owners query picks ours.
    let table = "phi_it_adm_cov";
    let tag = common::unique_owner("status");
    let options = Options::default()
        .owners_query(format!("SELECT owner_id FROM {table} WHERE owner_id LIKE '{tag}-%'"));
    let a = Admin::tagged(tag, options);
    let keyed = format!("{}-keyed", a.tag);
    let bare = format!("{}-bare", a.tag);
    owners_table(&a.db, table, &[&keyed, &bare]);
    a.keyring.seal(&"Doe".to_string(), &keyed, "t.c", b"r").expect("seal");

    let (status, body) = a.get(&format!("/key-status?owner={keyed}"));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["owner"]["owner"], json!(keyed));
    assert_eq!(body["owner"]["current_version"], json!(1));
    assert_eq!(body["owner"]["shredded"], json!(false));
    assert_eq!(body["owner"]["versions"][0]["state"], json!("active"));
    assert_eq!(body["owner"]["versions"][0]["kek_id"], json!("local-test"));
    assert!(body.get("coverage").is_none(), "one owner: no coverage");
    let keys = body["keys"].as_array().expect("keys by KEK and state");
    assert!(keys.iter().any(|k| k["kek_id"] == "local-test" && k["state"] == "active" && k["keys"].as_u64() >= Some(1)));
    assert_eq!(body["cache"]["creations"], json!(1), "this process's cache stats");
    assert_eq!(body["cache"]["cached_owners"], json!(1));

    // Overall: coverage of the configured owners query.
    let (status, body) = a.get("/key-status");
    assert_eq!(status, StatusCode::OK, "{body}");
    let cov = &body["coverage"];
    assert_eq!(cov["owners"], json!(2), "{cov}");
    assert_eq!(cov["with_active_key"], json!(1), "{cov}");
    assert_eq!(cov["without_key_owners"], json!([bare]), "{cov}");
    assert_eq!(cov["percent"], json!(50.0), "{cov}");

    // An unknown query parameter is a clear 400.
    let (status, body) = a.get("/key-status?ownr=x");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().expect("error").contains("ownr"), "{body}");

    // Each request is audited with the guard's actor.
    assert_eq!(a.admin_records(&keyed).len(), 1);
    let all = a.admin_records(admin::ALL_OWNERS);
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all[0].event.detail.as_deref().is_some_and(|d| d.contains("failed (400)")));
    assert!(all[1].event.detail.as_deref() == Some("GET /key-status: ok"));
}

#[test]
fn generate_key_for_one_owner_and_from_a_query_with_dry_run() {
    let table = "phi_it_adm_gen";
    // Refused unless the application allows a request's own query.
    let strict = Admin::new("gen-strict");
    let (status, body) = strict.post("/generate-key", json!({ "owners_query": "SELECT 'x'", "dry_run": true }));
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().expect("error").contains("allow_request_owners_query"), "{body}");
    let a = Admin::with_options("gen", Options::default().allow_request_owners_query(true));
    let one = format!("{}-one", a.tag);
    let q1 = format!("{}-q1", a.tag);
    let q2 = format!("{}-q2", a.tag);
    owners_table(&a.db, table, &[&q1, &q2]);

    // Dry run: nothing created.
    let (status, body) = a.post("/generate-key", json!({ "owner": one, "dry_run": true }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["would_generate"], json!(1));
    assert!(a.key_states(&one).is_empty(), "a dry run creates nothing");

    let (status, body) = a.post("/generate-key", json!({ "owner": one }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["generated"], json!(1));
    assert_eq!(a.key_states(&one), vec![(1, KeyState::Active)]);
    // Again: it has one; nothing more.
    let (_, body) = a.post("/generate-key", json!({ "owner": one }));
    assert_eq!(body["generated"], json!(0));
    assert_eq!(a.key_states(&one), vec![(1, KeyState::Active)]);

    // From a query, only our owners: dry run lists them, the run creates them.
    let query = format!("SELECT owner_id FROM {table} WHERE owner_id LIKE '{}-q%'", a.tag);
    let (status, body) = a.post("/generate-key", json!({ "owners_query": query, "dry_run": true }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["would_generate"], json!(2));
    assert_eq!(body["owners"], json!([q1, q2]));
    assert!(a.key_states(&q1).is_empty());
    let (status, body) = a.post("/generate-key", json!({ "owners_query": query }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["generated"], json!(2));
    assert_eq!(a.key_states(&q2), vec![(1, KeyState::Active)]);

    // The query runs read-only: one that writes is refused and changes nothing.
    let writing = format!("DELETE FROM {table} WHERE owner_id = '{q1}' RETURNING owner_id");
    let (status, body) = a.post("/generate-key", json!({ "owners_query": writing }));
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body["error"].as_str().expect("error").contains("read-only"), "{body}");
    let mut conn = a.db.conn();
    let left: i64 = diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {table} WHERE owner_id = '{q1}'"))
        .get_result::<Count>(&mut conn)
        .expect("count")
        .n;
    assert_eq!(left, 1, "the writing query changed nothing");

    // Bad bodies: clear 400s (or 422 for a body of the wrong shape).
    let (status, body) = a.post("/generate-key", json!({ "owner": one, "owners_query": query }));
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = a.post("/generate-key", json!({}));
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().expect("error").contains("owners_query"), "{body}");
    let (status, body) = a.post("/generate-key", json!({ "ownerz": one }));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"].as_str().expect("error").contains("ownerz"), "{body}");

    // The generate records of the keys; the admin records name the actor.
    assert!(a.audit(&one).iter().any(|r| r.event.action == AuditAction::Generate));
    assert_eq!(a.admin_records(&one).len(), 4, "{:?}", a.admin_records(&one));
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[test]
fn rotate_adds_a_version_audited_with_the_guards_actor() {
    let a = Admin::new("rot");
    let owner = format!("{}-o", a.tag);
    let (status, body) = a.post("/rotate", json!({ "owner": owner }));
    assert_eq!(status, StatusCode::CONFLICT, "no key yet: {body}");
    assert!(body["error"].as_str().expect("error").contains(&owner));

    a.keyring.seal(&"Doe".to_string(), &owner, "t.c", b"r").expect("seal");
    let (status, body) = a.post("/rotate", json!({ "owner": owner }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], json!(2));
    assert_eq!(a.key_states(&owner), vec![(1, KeyState::Active), (2, KeyState::Active)]);
    // The keyring the router holds seals under the new version at once.
    let sealed = a.keyring.seal(&"Roe".to_string(), &owner, "t.c", b"r2").expect("seal");
    assert_eq!(sealed.key_version(), Some(2));

    let rotate = a
        .audit(&owner)
        .into_iter()
        .find(|r| r.event.action == AuditAction::Rotate)
        .expect("rotate record");
    assert_eq!(rotate.event.actor, a.actor(), "the life-cycle record names the guard's actor");
    assert_eq!(rotate.event.key_version, Some(2));
    let admin = a.admin_records(&owner);
    assert_eq!(admin.len(), 2);
    assert_eq!(admin[0].event.detail.as_deref(), Some("POST /rotate: ok"));
    assert!(admin[1].event.detail.as_deref().is_some_and(|d| d.contains("failed (409)")));
}

#[test]
fn shred_needs_the_owner_repeated_in_confirm() {
    let a = Admin::new("shred");
    let owner = format!("{}-o", a.tag);
    let sealed = a.keyring.seal(&"Doe".to_string(), &owner, "t.c", b"r").expect("seal");

    for body in [json!({ "owner": owner }), json!({ "owner": owner, "confirm": "someone-else" })] {
        let (status, answer) = a.post("/shred", body);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer["error"].as_str().expect("error").contains("confirm"), "{answer}");
        assert_eq!(a.key_states(&owner), vec![(1, KeyState::Active)], "nothing changed");
    }

    let (status, body) = a.post("/shred", json!({ "owner": owner, "confirm": owner }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["destroyed_versions"], json!([1]));
    assert_eq!(body["keys_left"], json!(0));
    assert_eq!(a.key_states(&owner), vec![(1, KeyState::Destroyed)]);
    // This process's cache dropped the owner: its values no longer open.
    let err = a.keyring.open(sealed, &owner, "t.c", b"r").expect_err("shredded");
    assert!(matches!(err, phi::Error::Shredded { .. }), "{err}");
    let err = a.keyring.seal(&"x".to_string(), &owner, "t.c", b"r").expect_err("no new key");
    assert!(matches!(err, phi::Error::Shredded { .. }), "{err}");

    let destroy = a
        .audit(&owner)
        .into_iter()
        .find(|r| r.event.action == AuditAction::Destroy)
        .expect("destroy record");
    assert_eq!(destroy.event.actor, a.actor());
    assert_eq!(a.admin_records(&owner).len(), 3);

    // Shredding a mistyped owner says so.
    let (status, body) = a.post("/shred", json!({ "owner": format!("{owner}-typo"), "confirm": format!("{owner}-typo") }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key_rows"], json!(0));
    assert!(body["note"].as_str().expect("note").contains("mistyped"));
}

#[test]
fn audit_log_filters_by_owner_action_and_time_and_pages() {
    let a = Admin::new("log");
    let owner = format!("{}-o", a.tag);
    a.keyring.seal(&"Doe".to_string(), &owner, "t.c", b"r").expect("seal");
    for _ in 0..3 {
        let (status, _) = a.post("/rotate", json!({ "owner": owner }));
        assert_eq!(status, StatusCode::OK);
    }

    let (status, body) = a.get(&format!("/audit-log?owner={owner}&action=rotate"));
    assert_eq!(status, StatusCode::OK, "{body}");
    let records = body["records"].as_array().expect("records");
    let versions: Vec<&Value> = records.iter().map(|r| &r["key_version"]).collect();
    assert_eq!(versions, vec![&json!(4), &json!(3), &json!(2)], "newest first");
    assert!(records.iter().all(|r| r["actor"] == json!(a.actor()) && r["owner"] == json!(owner)));
    assert_eq!(body["next_before_id"], Value::Null, "one page");

    // Paging: two, then the rest.
    let (_, page1) = a.get(&format!("/audit-log?owner={owner}&action=rotate&limit=2"));
    assert_eq!(page1["records"].as_array().expect("records").len(), 2);
    let next = page1["next_before_id"].as_i64().expect("a next page");
    let (_, page2) = a.get(&format!("/audit-log?owner={owner}&action=rotate&limit=2&before_id={next}"));
    let rest = page2["records"].as_array().expect("records");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["key_version"], json!(2));

    // Time: nothing before 2000, everything since then.
    let (_, old) = a.get(&format!("/audit-log?owner={owner}&until=2000-01-01"));
    assert_eq!(old["records"], json!([]));
    let (_, recent) = a.get(&format!("/audit-log?owner={owner}&since=2000-01-01T00:00:00"));
    assert!(recent["records"].as_array().expect("records").len() >= 4);

    // Default limit 100: with no filter at most 100 come back.
    let (_, all) = a.get("/audit-log");
    assert!(all["records"].as_array().expect("records").len() <= admin::DEFAULT_AUDIT_LIMIT);

    // Bad filters are clear 400s.
    for (uri, names) in [
        ("/audit-log?action=explode", "explode"),
        ("/audit-log?since=yesterday", "since"),
        ("/audit-log?limit=0", "limit"),
        ("/audit-log?limit=100000", "limit"),
    ] {
        let (status, body) = a.get(uri);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert!(body["error"].as_str().expect("error").contains(names), "{uri}: {body}");
    }
}

#[test]
fn refused_requests_get_401_or_403_change_nothing_and_are_audited() {
    let a = Admin::new("deny");
    let owner = format!("{}-o", a.tag);
    a.keyring.seal(&"Doe".to_string(), &owner, "t.c", b"r").expect("seal");
    let fresh = format!("{}-fresh", a.tag);
    let viewer = format!("read-only-{}", a.tag);
    let attempts: Vec<(&str, &str, Option<Value>)> = vec![
        ("POST", "/rotate", Some(json!({ "owner": owner }))),
        ("POST", "/shred", Some(json!({ "owner": owner, "confirm": owner }))),
        ("POST", "/generate-key", Some(json!({ "owner": fresh }))),
        ("POST", "/clear-cache", Some(json!({ "owner": owner }))),
        ("POST", "/clear-cache", Some(json!({ "all": true }))),
        ("POST", "/rollout", Some(json!({ "mode": "nobody" }))),
        ("GET", "/key-status", None),
        ("GET", "/audit-log", None),
    ];
    for (method, uri, body) in &attempts {
        for (token, expected) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("forged"), StatusCode::UNAUTHORIZED),
            (Some(viewer.as_str()), StatusCode::FORBIDDEN),
        ] {
            let (status, answer) = call(&a.app, method, uri, &a.tag, token, body.clone());
            assert_eq!(status, expected, "{method} {uri} with {token:?}: {answer}");
            assert!(answer["error"].is_string(), "{answer}");
        }
    }
    // Nothing changed.
    assert_eq!(a.key_states(&owner), vec![(1, KeyState::Active)]);
    assert_eq!(a.keyring.stats().cached_owners, 1, "the cache was not cleared");
    assert_eq!(
        phi::lifecycle::fleet_rollout(a.db.store().as_ref(), &a.tag).expect("policy"),
        None,
        "no roll-out was set"
    );
    assert!(a.key_states(&fresh).is_empty());
    assert!(a.audit(&owner).iter().all(|r| r.event.action != AuditAction::Rotate
        && r.event.action != AuditAction::Destroy
        && r.event.action != AuditAction::Admin));
    // Each refusal is audited, with the actor when the guard knows it.
    let denied = a.denied_records();
    assert_eq!(denied.len(), attempts.len() * 3, "{denied:?}");
    let by_viewer = denied.iter().filter(|r| r.event.actor == format!("viewer-{}", a.tag)).count();
    assert_eq!(by_viewer, attempts.len());
    assert!(denied.iter().all(|r| r.event.owner_id == admin::ALL_OWNERS));
    assert!(denied.iter().any(|r| r.event.detail.as_deref().is_some_and(|d| d.starts_with("POST /shred refused (403)"))));
}

#[test]
fn refused_requests_over_the_audit_limit_are_answered_but_not_audited() {
    // Three refusals audited per hour: a test run is well inside one window.
    let options = Options::default().denied_audit_limit(3, std::time::Duration::from_secs(3600));
    let a = Admin::with_options("denied-limit", options);
    for _ in 0..5 {
        let (status, answer) = call(&a.app, "GET", "/key-status", &a.tag, Some("forged"), None);
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    }
    assert_eq!(a.denied_records().len(), 3, "only the window's first three are audited");
    // An admitted request is not limited.
    let (status, body) = a.get("/key-status");
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Reads the feed now and checks the follower has applied event `id`: its
/// own thread may have been first (woken by its interval, or at once by
/// PostgreSQL's NOTIFY), so what this read applied proves nothing.
fn applied(follower: &Keyring, id: i64) {
    follower.sync_feed();
    let position = follower.feed_status().expect("following").position;
    assert!(position >= id, "the follower is at #{position}, before event #{id}");
}

#[test]
fn clear_cache_clears_here_and_in_every_keyring_following_the_feed() {
    let a = Admin::new("clear");
    let owner = format!("{}-o", a.tag);
    let other = format!("{}-other", a.tag);
    let follower = a.follower();
    for k in [&a.keyring, &follower] {
        k.keys_for_seal(&owner).expect("keys");
        k.keys_for_seal(&other).expect("keys");
    }
    follower.sync_feed();
    let before = follower.stats().unwraps;

    let (status, body) = a.post("/clear-cache", json!({ "owner": owner }));
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["event_id"].as_i64().expect("event id");
    // Here at once.
    assert_eq!(a.keyring.stats().cached_owners, 1, "only the owner was cleared here");
    // In the follower once it reads the feed: the owner unwraps again, the
    // other owner does not.
    applied(&follower, id);
    follower.keys_for_open(&owner).expect("keys");
    follower.keys_for_open(&other).expect("keys");
    assert_eq!(follower.stats().unwraps, before + 1);

    // The feed event and the audit record name the guard's actor.
    let events = phi::lifecycle::read_feed(a.db.store().as_ref(), id - 1, 1).expect("feed");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event.kind, phi::feed::KeyEventKind::Clear);
    assert_eq!(events[0].event.owner_id.as_deref(), Some(owner.as_str()));
    assert_eq!(events[0].event.actor, a.actor());
    let audit = a.audit(&owner);
    assert!(audit.iter().any(|r| r.event.action == AuditAction::ClearCache && r.event.actor == a.actor()));

    // Bad bodies change nothing.
    let head = phi::lifecycle::feed_head(a.db.store().as_ref()).expect("head");
    for body in [json!({}), json!({ "owner": owner, "all": true }), json!({ "owner": "" })] {
        let (status, answer) = a.post("/clear-cache", body.clone());
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    let after = phi::lifecycle::read_feed(a.db.store().as_ref(), head, 100).expect("feed");
    assert!(after.iter().all(|e| e.event.actor != a.actor()), "no event appended: {after:?}");
    assert_eq!(a.admin_records(&owner).len(), 2, "the clear, and the refused one naming the owner");

    // Every owner: only on this test's own SQLite file; on a shared server
    // a clear of every owner would reach the other tests' keyrings.
    if server_url().is_none() {
        let (status, body) = a.post("/clear-cache", json!({ "all": true }));
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["all"], json!(true));
        assert_eq!(a.keyring.stats().cached_owners, 0);
        let id = body["event_id"].as_i64().expect("event id");
        applied(&follower, id);
        let before = follower.stats().unwraps;
        follower.keys_for_open(&other).expect("keys");
        assert_eq!(follower.stats().unwraps, before + 1);
    }
}

#[test]
fn rollout_sets_the_fleet_policy_here_and_in_followers() {
    let a = Admin::new("rollout");
    let in_ = format!("{}-in", a.tag);
    let out = format!("{}-out", a.tag);
    let follower = a.follower();
    let policy = || phi::lifecycle::fleet_rollout(a.db.store().as_ref(), &a.tag).expect("policy");

    let (status, body) = a.post("/rollout", json!({ "mode": "owners", "owners": [in_] }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["policy"], json!(a.tag));
    assert_eq!(body["rollout"], json!("1 owner(s)"));
    assert!(a.keyring.encrypts_for(&in_) && !a.keyring.encrypts_for(&out), "applied here at once");
    assert_eq!(policy(), Some(phi::Rollout::owners([in_.clone()])));
    applied(&follower, body["event_id"].as_i64().expect("event id"));
    assert!(follower.encrypts_for(&in_) && !follower.encrypts_for(&out), "the follower obeys");

    // Bad bodies: 400 (or 422 for the wrong shape), nothing changed.
    for body in [
        json!({ "mode": "some" }),
        json!({ "mode": "owners" }),
        json!({ "mode": "owners", "owners": [""] }),
        json!({ "mode": "all", "owners": [out] }),
    ] {
        let (status, answer) = a.post("/rollout", body.clone());
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    let (status, _) = a.post("/rollout", json!({ "owners": [out] }));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(policy(), Some(phi::Rollout::owners([in_.clone()])), "unchanged");

    let (status, body) = a.post("/rollout", json!({ "mode": "all" }));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(policy(), Some(phi::Rollout::All));
    follower.sync_feed();
    assert!(follower.encrypts_for(&out));

    // key-status shows the feed and the fleet's roll-out.
    let (_, status_body) = a.get("/key-status");
    assert_eq!(status_body["feed"]["fleet_rollout"], json!("all"));
    assert!(status_body["feed"]["head"].as_i64() >= Some(2));

    let rollouts: Vec<_> = a
        .audit(admin::ALL_OWNERS)
        .into_iter()
        .filter(|r| r.event.action == AuditAction::Rollout && r.event.actor == a.actor())
        .collect();
    assert_eq!(rollouts.len(), 2, "{rollouts:?}");
}

/// A KEK whose `generate` tells the test it was entered, then waits until
/// the test releases it: a fixed point inside an admitted request's action.
#[derive(Debug)]
struct ParkedKek {
    inner: Arc<dyn KeyEncryptionKey>,
    entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: std::sync::Barrier,
}

impl KeyEncryptionKey for ParkedKek {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn generate(&self, owner: &str, version: u32) -> Result<(phi::KeyBytes, Vec<u8>), phi::BoxError> {
        let entered = self.entered.lock().expect("lock").take();
        if let Some(entered) = entered {
            entered.send(()).expect("the test waits");
            self.release.wait();
        }
        self.inner.generate(owner, version)
    }
    fn wrap(&self, owner: &str, version: u32, key: &phi::KeyBytes) -> Result<Vec<u8>, phi::BoxError> {
        self.inner.wrap(owner, version, key)
    }
    fn unwrap(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<phi::KeyBytes, phi::BoxError> {
        self.inner.unwrap(owner, version, wrapped)
    }
    fn check_value(&self) -> Result<phi::KekCheck, phi::BoxError> {
        self.inner.check_value()
    }
    fn verify_check_value(&self, check: &phi::KekCheck) -> Result<bool, phi::BoxError> {
        self.inner.verify_check_value(check)
    }
}

#[test]
fn an_admitted_request_dropped_while_it_acts_still_gets_its_admin_record() {
    let db = TestDb::new();
    let tag = common::unique_owner("adm-dropped");
    let owner = common::unique_owner("adm-dropped-owner");
    let (entered, generating) = std::sync::mpsc::channel();
    let kek = Arc::new(ParkedKek {
        inner: common::local_kek(),
        entered: std::sync::Mutex::new(Some(entered)),
        release: std::sync::Barrier::new(2),
    });
    let keyring = Keyring::builder(db.store(), kek.clone())
        .actor("integration-test")
        .rollout_policy(&tag)
        .build()
        .expect("keyring");
    let app = admin::router(keyring, TestGuard);
    let request = Request::builder()
        .method("POST")
        .uri("/generate-key")
        .header("x-test", &tag)
        .header("authorization", format!("Bearer good-{tag}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({ "owner": owner }).to_string()))
        .expect("request");
    // Kept until the end: dropping a runtime waits for its blocking tasks.
    let runtime = runtime();
    runtime.block_on(async {
        let task = tokio::spawn(app.oneshot(request));
        // Fixed point: the action has started (the KEK is generating).
        tokio::task::spawn_blocking(move || generating.recv().expect("generate is entered")).await.expect("wait");
        // The request is dropped there (a client gone, a timeout).
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
    });
    kek.release.wait();
    let store = db.store();
    let records = |store: &dyn KeyStore| {
        let mut filter = AuditFilter::new(100);
        filter.owner = Some(owner.clone());
        store.audit_page(&filter).expect("audit")
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let admin_records = loop {
        let found: Vec<AuditRecord> = records(store.as_ref())
            .into_iter()
            .filter(|r| r.event.action == AuditAction::Admin && r.event.actor == format!("op-{tag}"))
            .collect();
        if !found.is_empty() || std::time::Instant::now() > until {
            break found;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(admin_records.len(), 1, "the dropped request's admin record was written");
    let detail = admin_records[0].event.detail.as_deref().unwrap_or_default();
    assert_eq!(detail, "POST /generate-key: ok", "with the action's outcome");
    // The action itself finished, audited as always.
    assert_eq!(store.load_keys(&[owner.as_str()]).expect("keys").len(), 1);
    assert!(records(store.as_ref()).iter().any(|r| r.event.action == AuditAction::Generate));
}

#[test]
fn a_refused_requests_audit_detail_is_bounded_in_bytes() {
    let a = Admin::new("denied-bounded");
    // The guard's reason repeats the client's header: 20,000 bytes of it.
    let long = format!("{}-{}", a.tag, "x".repeat(20_000));
    let (status, _) = call(&a.app, "GET", "/key-status", &long, Some("forged"), None);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let records = a.denied_records();
    assert_eq!(records.len(), 1);
    let detail = records[0].event.detail.as_deref().expect("detail");
    assert!(detail.len() <= admin::MAX_DENIED_DETAIL_BYTES, "{} bytes", detail.len());
    assert!(detail.starts_with("GET /key-status refused (401): no valid token ("), "{detail}");
    assert!(detail.contains("truncated from"), "says it was cut: {detail}");
}
