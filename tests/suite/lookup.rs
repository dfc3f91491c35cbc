// Lookup indexes: finding a record without knowing its owner. Included in
// `tests/suite/mod.rs`, so `Conn`, `BLOB`, `server_url()` and `TestDb` are
// in scope.

use phi::lookup::{self as lookup_index, LOOKUP_INDEX_LEN, LOOKUP_OWNER, ReindexOptions};
use phi::{PhiRecord, Rollout};

diesel::table! {
    phi_lk_users (user_id) {
        user_id -> Varchar,
        tenant_id -> Varchar,
        email -> Binary,
        full_name -> Nullable<Binary>,
        email_lookup -> Nullable<Binary>,
        phi_encrypted -> Bool,
    }
}

/// A login table: the e-mail address is sealed under the tenant's key and
/// found, at login, by its lookup index.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_lk_users, crate = phi, debug)]
#[diesel(primary_key(user_id))]
struct User {
    #[phi(row_key)]
    user_id: String,
    #[phi(owner)]
    tenant_id: String,
    #[phi(encrypt, lookup_index = email_lookup, normalize = "trim,lowercase")]
    email: String,
    #[phi(encrypt)]
    full_name: Option<String>,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

/// The reserved owner's key is one per database, and one test rotates it:
/// the tests of this file run one at a time.
pub(super) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn prepare_users(conn: &mut Conn) {
    let lookup_type = match BLOB {
        "BYTEA" => "BYTEA",
        _ if server_url().is_some() => "VARBINARY(20)",
        _ => "BLOB",
    };
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS phi_lk_users (user_id VARCHAR(64) NOT NULL PRIMARY KEY, \
         tenant_id VARCHAR(255) NOT NULL, email {BLOB} NOT NULL, full_name {BLOB} NULL, \
         email_lookup {lookup_type} NULL, phi_encrypted BOOLEAN NOT NULL)"
    );
    diesel::sql_query(ddl).execute(conn).expect("users table");
    let index = "CREATE UNIQUE INDEX phi_lk_users_email ON phi_lk_users (email_lookup)";
    // Created once; a second CREATE INDEX fails harmlessly on every backend.
    let _ = diesel::sql_query(index).execute(conn);
}

fn user(tenant: &str, id: &str, email: &str) -> User {
    User {
        user_id: id.to_owned(),
        tenant_id: tenant.to_owned(),
        email: email.to_owned(),
        full_name: Some("Jane Doe".to_owned()),
        phi_encrypted: true,
    }
}

fn insert_users(conn: &mut Conn, keyring: &Keyring, users: &[User]) -> phi::Result<usize> {
    let rows = User::seal_all(users, keyring)?;
    diesel::insert_into(phi_lk_users::table)
        .values(&rows)
        .execute(conn)
        .map_err(|source| Error::Database {
            operation: "inserting users",
            table: "phi_lk_users",
            source,
        })
}

fn stored_lookup(conn: &mut Conn, id: &str) -> Option<Vec<u8>> {
    phi_lk_users::table
        .filter(phi_lk_users::user_id.eq(id))
        .select(phi_lk_users::email_lookup)
        .first(conn)
        .expect("user row")
}

fn version_of(stored: &[u8]) -> u32 {
    assert_eq!(stored.len(), LOOKUP_INDEX_LEN);
    u32::from_be_bytes(stored[..4].try_into().expect("4 bytes"))
}

#[test]
fn phis_own_lookup_key_is_never_shredded() {
    let db = TestDb::new();
    let keyring = db.keyring();
    keyring.lookup_keys().expect("the lookup key");
    let err = phi::lifecycle::shred_keys_by(&keyring, LOOKUP_OWNER, "operator")
        .expect_err("phi's own key is refused");
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("never shredded"), "{err}");
    keyring.lookup_keys().expect("the lookup key is still there");
}

#[test]
fn a_record_is_found_by_value_without_knowing_its_owner() {
    let _serial = serial();
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_users(&mut conn);
    let keyring = db.keyring();
    let run = common::unique_owner("lk-find");
    let (a, b) = (format!("{run}-a"), format!("{run}-b"));
    let jane = format!("Jane.{run}@Example.org");
    let omar = format!("omar.{run}@example.org");
    insert_users(
        &mut conn,
        &keyring,
        &[user(&a, &format!("{run}-1"), &jane), user(&b, &format!("{run}-2"), &omar)],
    )
    .expect("insert");

    // A cold keyring, as at a login: no owner is known.
    let keyring = db.keyring();
    let wanted = format!("  jane.{run}@EXAMPLE.org ");
    let found = User::find_by_email(&wanted, &keyring, &mut conn).expect("find");
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].tenant_id.as_str(), found[0].email.as_str()), (a.as_str(), jane.as_str()));
    let found = User::find_by_email(&omar, &keyring, &mut conn).expect("find");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].tenant_id, b);
    let none = User::find_by_email(&format!("nobody.{run}@example.org"), &keyring, &mut conn)
        .expect("find");
    assert!(none.is_empty());

    // The stored value: 20 bytes, the reserved owner's key version first.
    let stored = stored_lookup(&mut conn, &format!("{run}-1")).expect("lookup value");
    let current = keyring.lookup_keys().expect("lookup keys").current_version();
    assert_eq!(Some(version_of(&stored)), current);

    // The reserved owner is no application owner.
    let refused = keyring.keys_for_seal(LOOKUP_OWNER).expect_err("reserved");
    assert!(matches!(refused, Error::InvalidInput { .. }), "{refused}");
    let refused = User::seal_all(&[user(LOOKUP_OWNER, &format!("{run}-x"), "x@example.org")], &keyring)
        .expect_err("reserved owner");
    assert!(refused.to_string().contains("owner id"), "{refused}");

    // The guarded update writes the new lookup value.
    let old = User::find_by_email(&jane, &keyring, &mut conn).expect("find").remove(0);
    let mut moved = old.clone();
    moved.email = format!("jane.doe.{run}@example.org");
    assert!(matches!(
        moved.update(&old, &keyring, &mut conn).expect("update"),
        phi::Updated::Applied { sealed: true }
    ));
    assert!(User::find_by_email(&jane, &keyring, &mut conn).expect("find").is_empty());
    let found = User::find_by_email(&moved.email, &keyring, &mut conn).expect("find");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].user_id, format!("{run}-1"));
}

#[test]
fn rows_stored_unsealed_are_found_too() {
    let _serial = serial();
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_users(&mut conn);
    let run = common::unique_owner("lk-plain");
    // Not following the feed: a fleet roll-out another test sets on this
    // shared database must not seal this row.
    let keyring = Keyring::builder(db.store(), common::local_kek())
        .rollout(Rollout::Nobody)
        .without_feed()
        .build()
        .expect("keyring");
    let email = format!("plain.{run}@example.org");
    let mut plain = user(&run, &format!("{run}-1"), &email);
    plain.phi_encrypted = false;
    insert_users(&mut conn, &keyring, &[plain]).expect("insert");
    let found = User::find_by_email(&email.to_uppercase(), &keyring, &mut conn).expect("find");
    assert_eq!(found.len(), 1);
    assert!(!found[0].phi_encrypted);
    assert!(stored_lookup(&mut conn, &format!("{run}-1")).is_some());
}

#[test]
fn a_unique_index_on_the_lookup_column_refuses_one_address_for_two_owners() {
    let _serial = serial();
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_users(&mut conn);
    let keyring = db.keyring();
    let run = common::unique_owner("lk-unique");
    let email = format!("jane.{run}@example.org");
    insert_users(&mut conn, &keyring, &[user(&format!("{run}-a"), &format!("{run}-1"), &email)])
        .expect("first insert");
    // Another owner, the same address once normalised.
    let again = format!(" JANE.{run}@example.org");
    let err = insert_users(&mut conn, &keyring, &[user(&format!("{run}-b"), &format!("{run}-2"), &again)])
        .expect_err("the unique index refuses it");
    match &err {
        Error::Database {
            table,
            source: diesel::result::Error::DatabaseError(kind, _),
            ..
        } => {
            assert_eq!(*table, "phi_lk_users");
            assert!(
                matches!(kind, diesel::result::DatabaseErrorKind::UniqueViolation),
                "{kind:?}: {err}"
            );
        }
        other => panic!("expected a unique violation, got {other}"),
    }
    assert!(err.to_string().contains("phi_lk_users"), "{err}");
    // Still one user with that address.
    assert_eq!(User::find_by_email(&email, &keyring, &mut conn).expect("find").len(), 1);
}

#[test]
fn rows_stay_findable_through_rotation_reindex_and_retirement() {
    let _serial = serial();
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_users(&mut conn);
    let keyring = db.keyring();
    let run = common::unique_owner("lk-rotate");
    let emails: Vec<String> = (0..3).map(|i| format!("u{i}.{run}@example.org")).collect();
    let users: Vec<User> = emails
        .iter()
        .enumerate()
        .map(|(i, e)| user(&format!("{run}-t{}", i % 2), &format!("{run}-{i}"), e))
        .collect();
    insert_users(&mut conn, &keyring, &users).expect("insert");
    let old = keyring.lookup_keys().expect("keys").current_version().expect("version");

    let new = phi::lifecycle::rotate(&keyring, LOOKUP_OWNER).expect("rotate");
    assert!(new > old);
    // Found during the transition, under the old version.
    for e in &emails {
        assert_eq!(User::find_by_email(e, &keyring, &mut conn).expect("find").len(), 1, "{e}");
    }
    let late = format!("late.{run}@example.org");
    insert_users(&mut conn, &keyring, &[user(&run, &format!("{run}-late"), &late)]).expect("insert");
    assert_eq!(version_of(&stored_lookup(&mut conn, &format!("{run}-late")).expect("value")), new);
    assert_eq!(version_of(&stored_lookup(&mut conn, &format!("{run}-0")).expect("value")), old);

    let mut seen = Vec::new();
    let options = ReindexOptions::default().batch(2).progress(|p| seen.push((p.table, p.done, p.total)));
    let report = lookup_index::reindex::<User, _>(&mut conn, &keyring, &options).expect("reindex");
    drop(options);
    assert_eq!(report.version, new);
    assert!(report.rewritten >= 3, "{report}");
    // One report a batch of at most 2 rows.
    assert!(seen.len() as u64 >= report.rows.div_ceil(2), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1 && w[1].1 - w[0].1 <= 2), "{seen:?}");
    // The last one all of them; the total counted as it started (other
    // tests may write the table meanwhile), this test's 4 rows at least.
    let &(table, done, total) = seen.last().expect("a report");
    assert_eq!((table, done), (report.table, report.rows));
    assert!(total >= 4, "{seen:?}");
    for i in 0..3 {
        let stored = stored_lookup(&mut conn, &format!("{run}-{i}")).expect("value");
        assert_eq!(version_of(&stored), new);
    }
    // Resumable: a second run finds nothing to do.
    let again = lookup_index::reindex::<User, _>(&mut conn, &keyring, &ReindexOptions::default())
        .expect("reindex");
    assert_eq!(again.rewritten, 0, "{again}");
    for e in emails.iter().chain([&late]) {
        assert_eq!(User::find_by_email(e, &keyring, &mut conn).expect("find").len(), 1, "{e}");
    }

    assert!(phi::lifecycle::retire(&mut conn, &keyring, LOOKUP_OWNER, old, &[]).expect("retire"));
    let cold = db.keyring();
    for e in emails.iter().chain([&late]) {
        assert_eq!(User::find_by_email(e, &cold, &mut conn).expect("find").len(), 1, "{e}");
    }
}

#[test]
fn reindex_skips_the_rows_of_a_shredded_owner_and_finishes_the_rest() {
    let _serial = serial();
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_users(&mut conn);
    let keyring = db.keyring();
    let run = common::unique_owner("lk-shred");
    let (gone, kept) = (format!("{run}-gone"), format!("{run}-kept"));
    let users = [
        user(&gone, &format!("{run}-1"), &format!("g1.{run}@example.org")),
        user(&kept, &format!("{run}-2"), &format!("k2.{run}@example.org")),
        user(&gone, &format!("{run}-3"), &format!("g3.{run}@example.org")),
    ];
    insert_users(&mut conn, &keyring, &users).expect("insert");
    let old = keyring.lookup_keys().expect("keys").current_version().expect("version");
    phi::lifecycle::shred_keys_by(&keyring, &gone, "operator").expect("shred");
    let new = phi::lifecycle::rotate(&keyring, LOOKUP_OWNER).expect("rotate");

    // A fresh keyring, as a job run by an operator; batches of two so that
    // the shredded owner's rows fall in batches with other owners' rows.
    let report = lookup_index::reindex::<User, _>(&mut conn, &db.keyring(), &ReindexOptions::default().batch(2))
        .expect("the shredded owner's rows do not stop the job");
    assert!(report.shredded >= 2, "{report}");
    assert!(report.to_string().contains("shredded"), "{report}");
    assert_eq!(version_of(&stored_lookup(&mut conn, &format!("{run}-2")).expect("value")), new);
    for id in [1, 3] {
        let stored = stored_lookup(&mut conn, &format!("{run}-{id}")).expect("value");
        assert_eq!(version_of(&stored), old, "a shredded owner's row is left as it is");
    }
    // Still resumable: nothing more to rewrite, the same rows skipped.
    let again = lookup_index::reindex::<User, _>(&mut conn, &db.keyring(), &ReindexOptions::default())
        .expect("reindex");
    assert_eq!(again.rewritten, 0, "{again}");
    assert_eq!(again.shredded, report.shredded, "{again}");
}

#[test]
fn a_finder_leaves_out_shredded_owners_and_names_a_tampered_row() {
    let _serial = serial();
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_users(&mut conn);
    let keyring = db.keyring();
    let run = common::unique_owner("lk-open");
    let (gone, kept) = (format!("{run}-gone"), format!("{run}-kept"));
    let (g, k, t) = (
        format!("g.{run}@example.org"),
        format!("k.{run}@example.org"),
        format!("t.{run}@example.org"),
    );
    insert_users(
        &mut conn,
        &keyring,
        &[
            user(&gone, &format!("{run}-g"), &g),
            user(&kept, &format!("{run}-k"), &k),
            user(&kept, &format!("{run}-t"), &t),
        ],
    )
    .expect("insert");
    phi::lifecycle::shred_keys_by(&keyring, &gone, "operator").expect("shred");

    // The shredded owner's row matches, and is left out; others are found.
    let cold = db.keyring();
    assert!(User::find_by_email(&g, &cold, &mut conn).expect("find").is_empty());
    assert_eq!(User::find_by_email(&k, &cold, &mut conn).expect("find").len(), 1);

    // Row t's address replaced by row k's sealed one (the same owner, another
    // row): it matches t's lookup value but does not authenticate.
    let k_sealed: Vec<u8> = phi_lk_users::table
        .filter(phi_lk_users::user_id.eq(format!("{run}-k")))
        .select(phi_lk_users::email)
        .first(&mut conn)
        .expect("row k");
    diesel::update(phi_lk_users::table.filter(phi_lk_users::user_id.eq(format!("{run}-t"))))
        .set(phi_lk_users::email.eq(k_sealed))
        .execute(&mut conn)
        .expect("tamper");
    let result = User::find_by_email(&t, &cold, &mut conn);
    // The shared table must not keep a row that does not open.
    diesel::delete(phi_lk_users::table.filter(phi_lk_users::user_id.eq(format!("{run}-t"))))
        .execute(&mut conn)
        .expect("clean up");
    let err = result.expect_err("a tampered value is an error");
    let text = err.to_string();
    assert!(text.contains("phi_lk_users.email"), "{text}");
    assert!(text.contains(&kept), "{text}");
    let source = std::error::Error::source(&err).expect("source").to_string();
    assert!(source.contains(&format!("{run}-t")), "{source}");
    assert!(source.contains("authentication failed"), "{source}");
}
