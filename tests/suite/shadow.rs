// The dual-write (shadow column) phase: a table keeps its plaintext columns
// and gains `<column>_encrypted` columns, which the model fills when it
// seals a row and reads when the row is sealed. Included in
// `tests/suite/mod.rs`, so `Conn`, `BLOB`, `server_url()` and `TestDb` are
// in scope. The test owns its table (on a server, dropped and created
// again at its start).

use phi::migrate::{self, MigrateOptions, Migratable, ProblemKind, VerifyOptions};
use phi::{PhiRecord, Rollout, Updated, lifecycle};

diesel::table! {
    phi_it_shadow (client_id) {
        client_id -> Varchar,
        workspace_id -> Varchar,
        last_name -> Varchar,
        nickname -> Nullable<Text>,
        birth_date -> Date,
        last_name_encrypted -> Nullable<Binary>,
        nickname_encrypted -> Nullable<Binary>,
        birth_date_encrypted -> Nullable<Binary>,
        phi_encrypted -> Bool,
        last_name_bidx -> Nullable<Binary>,
    }
}

/// A client record during the dual-write phase.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_shadow, crate = phi, debug)]
#[diesel(primary_key(client_id))]
struct Client {
    #[phi(row_key)]
    client_id: String,
    #[phi(owner)]
    workspace_id: String,
    #[phi(encrypt, shadow, blind_index = last_name_bidx, normalize = "trim,lowercase")]
    last_name: String,
    #[phi(encrypt, shadow)]
    nickname: Option<String>,
    #[phi(encrypt, shadow)]
    birth_date: NaiveDate,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

fn shadow_table(conn: &mut Conn) {
    let index = if BLOB == "BYTEA" { "BYTEA" } else if server_url().is_some() { "VARBINARY(16)" } else { "BLOB" };
    diesel::sql_query("DROP TABLE IF EXISTS phi_it_shadow").execute(conn).expect("drop");
    // The plaintext columns are nullable in the database, as a finalize's
    // down migration brings them back (the application's schema above says
    // what it writes: never NULL).
    diesel::sql_query(format!(
        "CREATE TABLE phi_it_shadow (client_id VARCHAR(64) NOT NULL PRIMARY KEY, workspace_id VARCHAR(255) NOT NULL, \
         last_name VARCHAR(255) NULL, nickname TEXT NULL, birth_date DATE NULL, \
         last_name_encrypted {BLOB} NULL, nickname_encrypted {BLOB} NULL, birth_date_encrypted {BLOB} NULL, \
         phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE, last_name_bidx {index} NULL)"
    ))
    .execute(conn)
    .expect("create");
    diesel::sql_query("CREATE INDEX phi_it_shadow_last ON phi_it_shadow (last_name)")
        .execute(conn)
        .expect("index on a plaintext column");
}

fn client(id: &str, owner: &str, last: &str, nick: Option<&str>, dob: (i32, u32, u32)) -> Client {
    Client {
        client_id: id.to_owned(),
        workspace_id: owner.to_owned(),
        last_name: last.to_owned(),
        nickname: nick.map(str::to_owned),
        birth_date: NaiveDate::from_ymd_opt(dob.0, dob.1, dob.2).expect("date"),
        phi_encrypted: false,
    }
}

/// A row as stored: plaintext columns, which shadow columns are set, flag,
/// whether the blind index is set.
type Raw = (String, Option<String>, Option<NaiveDate>, [bool; 3], bool, bool);

/// The columns of a row as read by SQL.
type StoredRow = (
    Option<String>,
    Option<String>,
    Option<NaiveDate>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    bool,
    Option<Vec<u8>>,
);

fn raw(conn: &mut Conn, id: &str) -> Raw {
    use phi_it_shadow::dsl as s;
    let (last, nick, dob, a, b, c, flag, bidx): StoredRow = s::phi_it_shadow
        .find(id)
        .select((
            s::last_name.nullable(),
            s::nickname,
            s::birth_date.nullable(),
            s::last_name_encrypted,
            s::nickname_encrypted,
            s::birth_date_encrypted,
            s::phi_encrypted,
            s::last_name_bidx,
        ))
        .first(conn)
        .expect("raw row");
    (last.unwrap_or_default(), nick, dob, [a.is_some(), b.is_some(), c.is_some()], flag, bidx.is_some())
}

fn all(conn: &mut Conn, keyring: &Keyring, owner: &str) -> phi::Result<Vec<Client>> {
    Client::load(
        phi_it_shadow::table
            .filter(phi_it_shadow::workspace_id.eq(owner.to_owned()))
            .order(phi_it_shadow::client_id),
        conn,
        keyring,
    )
}

fn values(clients: &[Client]) -> Vec<(String, String, Option<String>, NaiveDate)> {
    clients
        .iter()
        .map(|c| (c.client_id.clone(), c.last_name.clone(), c.nickname.clone(), c.birth_date))
        .collect()
}

fn insert(conn: &mut Conn, keyring: &Keyring, c: &Client) {
    let row = c.seal(keyring).expect("seal");
    diesel::insert_into(phi_it_shadow::table).values(&row).execute(conn).expect("insert");
}

#[test]
fn shadow_columns_through_dual_write_backfill_verify_reseal_and_decrypt_back() {
    let db = TestDb::new();
    let mut conn = db.conn();
    shadow_table(&mut conn);
    let owner = common::unique_owner("shadow");
    let keyring = db.keyring();
    let plain = db.keyring();
    plain.set_rollout(Rollout::Nobody);

    // Rows written before phi, by plain SQL.
    diesel::sql_query(format!(
        "INSERT INTO phi_it_shadow (client_id, workspace_id, last_name, nickname, birth_date) VALUES \
         ('S-1', '{owner}', 'Doe', NULL, '1980-01-15'), ('S-2', '{owner}', 'García', 'Gigi', '1975-06-30')"
    ))
    .execute(&mut conn)
    .expect("legacy rows");
    // The application writes through the model: roll-out nobody, then all.
    insert(&mut conn, &plain, &client("S-3", &owner, "Nwosu", Some("Ada"), (1990, 2, 28)));
    assert_eq!(
        raw(&mut conn, "S-3"),
        ("Nwosu".into(), Some("Ada".into()), NaiveDate::from_ymd_opt(1990, 2, 28), [false; 3], false, false),
        "unsealed: plaintext only"
    );
    insert(&mut conn, &keyring, &client("S-4", &owner, " Zhang ", None, (2001, 12, 1)));
    assert_eq!(
        raw(&mut conn, "S-4"),
        (" Zhang ".into(), None, NaiveDate::from_ymd_opt(2001, 12, 1), [true, false, true], true, true),
        "sealed: plaintext and shadow, the blind index, the flag on"
    );

    let expected = vec![
        ("S-1".to_owned(), "Doe".to_owned(), None, NaiveDate::from_ymd_opt(1980, 1, 15).expect("date")),
        ("S-2".to_owned(), "García".to_owned(), Some("Gigi".to_owned()), NaiveDate::from_ymd_opt(1975, 6, 30).expect("date")),
        ("S-3".to_owned(), "Nwosu".to_owned(), Some("Ada".to_owned()), NaiveDate::from_ymd_opt(1990, 2, 28).expect("date")),
        ("S-4".to_owned(), " Zhang ".to_owned(), None, NaiveDate::from_ymd_opt(2001, 12, 1).expect("date")),
    ];
    assert_eq!(values(&all(&mut conn, &keyring, &owner).expect("load")), expected);

    // The sealed row's shadow is what is read: altering its plaintext by
    // hand does not change what the model returns.
    diesel::sql_query("UPDATE phi_it_shadow SET last_name = 'Mallory' WHERE client_id = 'S-4'")
        .execute(&mut conn)
        .expect("alter");
    assert_eq!(all(&mut conn, &keyring, &owner).expect("load")[3].last_name, " Zhang ");
    diesel::sql_query("UPDATE phi_it_shadow SET last_name = ' Zhang ' WHERE client_id = 'S-4'")
        .execute(&mut conn)
        .expect("restore");

    // Blind index lookups query the index column, as in place.
    let wanted = Client::last_name_blind_index(&keyring, &owner, "zhang").expect("index");
    let found = Client::load(
        phi_it_shadow::table.filter(phi_it_shadow::last_name_bidx.eq_any(wanted)),
        &mut conn,
        &keyring,
    )
    .expect("find");
    assert_eq!(found.iter().map(|c| c.client_id.as_str()).collect::<Vec<_>>(), ["S-4"]);

    // Guarded updates during the dual-write phase: a sealed row stays
    // sealed, its plaintext column follows.
    let old = all(&mut conn, &keyring, &owner).expect("load");
    let mut edited = old[3].clone();
    edited.nickname = Some("Zee".to_owned());
    assert_eq!(edited.update(&old[3], &keyring, &mut conn).expect("update"), Updated::Applied { sealed: true });
    assert_eq!(raw(&mut conn, "S-4").1.as_deref(), Some("Zee"));
    assert_eq!(raw(&mut conn, "S-4").3, [true, true, true]);
    // An unsealed row edited under roll-out nobody stays plain.
    let mut edited = old[2].clone();
    edited.last_name = "Nwosu-Obi".to_owned();
    assert_eq!(edited.update(&old[2], &plain, &mut conn).expect("update"), Updated::Applied { sealed: false });
    assert_eq!(raw(&mut conn, "S-3").0, "Nwosu-Obi");
    assert_eq!(raw(&mut conn, "S-3").3, [false; 3]);
    // An edit read before the backfill sealed the row is refused.
    let stale = all(&mut conn, &plain, &owner).expect("load")[1].clone();

    let before: Vec<Raw> = ["S-1", "S-2", "S-3", "S-4"].iter().map(|id| raw(&mut conn, id)).collect();
    let report = migrate::backfill::<Client, _>(&mut conn, &keyring, &MigrateOptions::default().batch(2))
        .expect("backfill");
    assert_eq!((report.rows, report.remaining), (3, 0), "{report}");
    for (id, was) in ["S-1", "S-2", "S-3", "S-4"].iter().zip(&before) {
        let now = raw(&mut conn, id);
        assert_eq!((&now.0, &now.1, &now.2), (&was.0, &was.1, &was.2), "{id}: the plaintext columns are not modified");
        assert!(now.4 && now.5, "{id}: sealed, indexed");
        assert_eq!(now.3, [true, now.1.is_some(), true], "{id}: a shadow for every value");
    }
    let mut edited = stale.clone();
    edited.nickname = Some("G".to_owned());
    assert_eq!(edited.update(&stale, &keyring, &mut conn).expect("update"), Updated::Conflict);

    let expected_now: Vec<_> = {
        let mut e = expected.clone();
        e[2].1 = "Nwosu-Obi".to_owned();
        e[3].2 = Some("Zee".to_owned());
        e
    };
    assert_eq!(values(&all(&mut conn, &keyring, &owner).expect("load")), expected_now);
    let checked = migrate::verify::<Client, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(checked.is_ok() && checked.sealed == 4, "{checked}");

    // A plaintext column changed by hand on a sealed row: verify names the
    // row, never a value.
    diesel::sql_query("UPDATE phi_it_shadow SET last_name = 'Mallory' WHERE client_id = 'S-2'")
        .execute(&mut conn)
        .expect("alter");
    let checked = migrate::verify::<Client, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert_eq!(checked.failed, 1, "{checked}");
    let failure = &checked.failures[0];
    assert_eq!(
        (failure.kind, failure.column, failure.row_key.as_str(), failure.owner.as_str()),
        (ProblemKind::ShadowMismatch, "last_name", "S-2", owner.as_str())
    );
    let text = checked.to_string();
    assert!(text.contains("phi_it_shadow.last_name") && text.contains("S-2"), "{text}");
    assert!(!text.contains("Mallory") && !text.contains("García"), "no value in the report: {text}");
    diesel::sql_query("UPDATE phi_it_shadow SET last_name = 'García' WHERE client_id = 'S-2'")
        .execute(&mut conn)
        .expect("restore");
    assert!(migrate::verify::<Client, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify").is_ok());

    // Re-seal after rotation works on the shadow columns.
    assert_eq!(lifecycle::rotate(&keyring, &owner).expect("rotate"), 2);
    let tables = [Client::reseal_table().expect("reseal table")];
    let resealed = lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &lifecycle::ResealOptions::default().batch_size(3)).expect("reseal");
    assert_eq!((resealed.total, resealed.resealed), (11, 11), "4 + 3 + 4 values");
    let usage = lifecycle::usage(&mut conn, &owner, &tables).expect("usage");
    assert!(!usage.is_empty() && usage.iter().all(|u| u.key_version == 2), "{usage:?}");
    assert_eq!(values(&all(&mut conn, &keyring, &owner).expect("load")), expected_now);
    assert!(migrate::verify::<Client, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify").is_ok());

    // A sealed row whose shadow is NULL: a clear error naming table,
    // column and row; decrypt-back keeps its plaintext.
    diesel::sql_query("UPDATE phi_it_shadow SET birth_date_encrypted = NULL WHERE client_id = 'S-3'")
        .execute(&mut conn)
        .expect("clear shadow");
    let err = all(&mut conn, &keyring, &owner).expect_err("NULL shadow");
    let message = format!("{err} {:?}", std::error::Error::source(&err).map(ToString::to_string));
    assert!(
        message.contains("phi_it_shadow") && message.contains("birth_date_encrypted") && message.contains("S-3"),
        "{message}"
    );

    let back = migrate::decrypt_back::<Client, _>(&mut conn, &keyring, &MigrateOptions::default())
        .expect("decrypt-back");
    assert_eq!((back.rows, back.remaining), (4, 0), "{back}");
    for id in ["S-1", "S-2", "S-3", "S-4"] {
        let now = raw(&mut conn, id);
        assert_eq!((now.3, now.4, now.5), ([false; 3], false, false), "{id}: shadows, index and flag cleared");
    }
    assert_eq!(values(&all(&mut conn, &keyring, &owner).expect("load")), expected_now);
    assert!(migrate::verify::<Client, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify").is_ok());

    // Sealed again, then the plaintext columns emptied as a finalize's down
    // migration leaves them: verify fails, decrypt-back refills them.
    migrate::backfill::<Client, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("backfill");
    diesel::sql_query("UPDATE phi_it_shadow SET last_name = NULL, nickname = NULL, birth_date = NULL")
        .execute(&mut conn)
        .expect("empty the plaintext columns");
    let checked = migrate::verify::<Client, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert_eq!(checked.failed, 4, "{checked}");
    assert!(checked.failures.iter().all(|f| f.kind == ProblemKind::ShadowMismatch), "{checked}");
    let back = migrate::decrypt_back::<Client, _>(&mut conn, &keyring, &MigrateOptions::default())
        .expect("decrypt-back");
    assert_eq!(back.rows, 4, "{back}");
    assert_eq!(values(&all(&mut conn, &keyring, &owner).expect("load")), expected_now);
    let dates: Vec<Option<NaiveDate>> = ["S-1", "S-2", "S-3", "S-4"].iter().map(|id| raw(&mut conn, id).2).collect();
    assert_eq!(dates, expected_now.iter().map(|e| Some(e.3)).collect::<Vec<_>>(), "dates written back as dates");
}
