// Importing values encrypted before phi (Fernet tokens, `v1:` AES-GCM
// texts), strict mode, and the database's own guard on sealed rows.
// Included in `tests/suite/mod.rs`, so `Conn`, `BLOB`, `server_url()` and
// `TestDb` are in scope. Each test owns its table (on a server, dropped and
// created again at its start). The legacy values are those of
// `tests/fixtures/legacy.json`, written by Python's `cryptography`
// (`tests/fixtures/legacy.py`).

use phi::legacy::{self, Dialect, LegacyDecoder, LegacyErrorKind, LegacyValue, VersionedGcmDecoder};
use phi::migrate::{self, MigrateOptions, VerifyOptions};
use phi::{KeyBytes, PhiRecord, Rollout, Updated};

/// A table written before phi: a text and a nullable date, stored as an
/// earlier scheme stored them, the flag off.
macro_rules! imported_table {
    ($table:ident, $model:ident, $raw:ident) => {
        diesel::table! {
            $table (id) {
                id -> Varchar,
                owner_id -> Varchar,
                last -> Binary,
                dob -> Nullable<Binary>,
                sealed -> Bool,
            }
        }

        #[derive(phi::PhiRecord, Clone, PartialEq)]
        #[phi(table = $table, crate = phi, debug)]
        #[diesel(primary_key(id))]
        pub(crate) struct $model {
            #[phi(row_key)]
            pub(crate) id: String,
            #[phi(owner)]
            pub(crate) owner_id: String,
            #[phi(encrypt)]
            pub(crate) last: String,
            #[phi(encrypt)]
            pub(crate) dob: Option<NaiveDate>,
            #[phi(encrypted_flag)]
            pub(crate) sealed: bool,
        }

        /// A row as the application stored it before phi.
        #[derive(Insertable)]
        #[diesel(table_name = $table)]
        pub(crate) struct $raw {
            pub(crate) id: String,
            pub(crate) owner_id: String,
            pub(crate) last: Vec<u8>,
            pub(crate) dob: Option<Vec<u8>>,
            pub(crate) sealed: bool,
        }
    };
}

// Each test uses part of the generated API (and the Fernet one only with
// its feature).
#[allow(dead_code)]
mod fernet_table {
    use super::*;
    imported_table!(phi_it_lg_fernet, Imported, RawImported);
}
#[allow(dead_code)]
mod gcm_table {
    use super::*;
    imported_table!(phi_it_lg_gcm, Imported, RawImported);
}
#[allow(dead_code)]
mod strict_table {
    use super::*;
    imported_table!(phi_it_lg_strict, Imported, RawImported);
}
#[allow(dead_code)]
mod check_table {
    use super::*;
    imported_table!(phi_it_lg_check, Imported, RawImported);
}
#[allow(dead_code)]
mod oracle_table {
    use super::*;
    imported_table!(phi_it_lg_oracle, Imported, RawImported);
}
#[allow(dead_code)]
mod recorded_sql_table {
    use super::*;
    imported_table!(phi_it_lg_recsql, Imported, RawImported);
}
#[allow(dead_code)]
mod wrapped_table {
    use super::*;
    imported_table!(phi_it_lg_wrapped, Imported, RawImported);
}

#[allow(dead_code)]
mod reads_table {
    use super::*;
    imported_table!(phi_it_lg_reads, Imported, RawImported);
}

fn create_imported(conn: &mut Conn, table: &str) {
    diesel::sql_query(format!("DROP TABLE IF EXISTS {table}")).execute(conn).expect("drop");
    // Records of an earlier run's table of that name.
    diesel::delete(phi::schema::phi_legacy_values::table.filter(phi::schema::phi_legacy_values::table_name.eq(table)))
        .execute(conn)
        .expect("old records");
    diesel::sql_query(format!(
        "CREATE TABLE {table} (id VARCHAR(64) NOT NULL PRIMARY KEY, owner_id VARCHAR(255) NOT NULL, \
         last {BLOB} NOT NULL, dob {BLOB} NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)"
    ))
    .execute(conn)
    .expect("create");
}

/// The fixtures written by `tests/fixtures/legacy.py`.
fn fixtures() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/legacy.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("tests/fixtures/legacy.json")).expect("fixture JSON")
}

/// The stored value named `name` of `format` (`fernet`, `gcm`).
fn fixture(all: &serde_json::Value, format: &str, name: &str) -> (Vec<u8>, Option<String>) {
    let item = all[format]
        .as_array()
        .expect("a list")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("fixture {format}/{name}"));
    (
        item["stored"].as_str().expect("stored").as_bytes().to_vec(),
        item["plain"].as_str().map(str::to_owned),
    )
}

fn gcm_decoder(all: &serde_json::Value) -> VersionedGcmDecoder {
    let key = |v: &str| {
        KeyBytes::from_slice(&hex::decode(all["gcm_keys"][v].as_str().expect("key")).expect("hex")).expect("32 bytes")
    };
    VersionedGcmDecoder::new().key("v1", key("v1")).key("v2", key("v2"))
}

/// The whole chain of an error's messages.
fn chain(err: &Error) -> String {
    std::iter::successors(Some(err as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Every value of `format` through the decoder alone: the good ones open
/// to the text Python encrypted, the others fail with the expected kind.
fn check_decoder(decoder: &dyn LegacyDecoder, all: &serde_json::Value, format: &str, failures: &[(&str, LegacyErrorKind)]) {
    for item in all[format].as_array().expect("a list") {
        let name = item["name"].as_str().expect("name");
        let stored = item["stored"].as_str().expect("stored").as_bytes();
        let opened = decoder.open(&LegacyValue::new("t", "c", "o", "r", stored));
        match item["plain"].as_str() {
            Some(plain) => {
                let opened = opened.unwrap_or_else(|e| panic!("{name}: {e}")).expect("recognised");
                assert_eq!(opened.plaintext.as_slice(), plain.as_bytes(), "{name}");
            }
            None => {
                let err = opened.expect_err(name);
                let expected = &failures.iter().find(|(n, _)| *n == name).expect("an expected failure").1;
                assert_eq!(&err.kind, expected, "{name}");
                assert!(!err.to_string().contains(std::str::from_utf8(stored).expect("text")), "{err}");
            }
        }
    }
    // Not in the format: left to the plain decoding.
    assert!(decoder.open(&LegacyValue::new("t", "c", "o", "r", b"Doe")).expect("plain").is_none());
}

/// Backfill from legacy values, on one of the tables above: the dry run
/// counts them per format, verify reports those that do not open, the
/// backfill stops at the first with its batch rolled back, then seals the
/// plaintext of every value once the bad ones are replaced.
macro_rules! backfill_imported {
    ($module:ident, $t:ident, $decoder:expr, $format:literal, $fixture:literal, $values:expr, $bad:expr) => {{
        use $module::{Imported, RawImported};
        let table = stringify!($t).to_owned();
        let db = TestDb::new();
        let mut conn = db.conn();
        create_imported(&mut conn, &table);
        let all = fixtures();
        let owners: Vec<String> = (0..2).map(|i| common::unique_owner(&format!("lg{}{i}", $format))).collect();
        // (row, last, dob) by fixture name; `None` for a plain value.
        let values: Vec<(&str, &str, Option<&str>)> = $values;
        let raw: Vec<RawImported> = values
            .iter()
            .enumerate()
            .map(|(i, (id, last, dob))| RawImported {
                id: (*id).to_owned(),
                owner_id: owners[i % 2].clone(),
                last: match last.strip_prefix("plain:") {
                    Some(plain) => plain.as_bytes().to_vec(),
                    None => fixture(&all, $fixture, last).0,
                },
                dob: dob.map(|d| fixture(&all, $fixture, d).0),
                sealed: false,
            })
            .collect();
        diesel::insert_into($module::$t::table).values(&raw).execute(&mut conn).expect("legacy rows");
        let keyring = db.keyring();
        let decoder: Arc<dyn LegacyDecoder> = Arc::new($decoder);
        let options = MigrateOptions::default().batch(2).legacy(decoder.clone());
        // Recorded before any phi writer runs: the values the backfill may decode.
        let recorded = migrate::record_legacy::<Imported, _>(&mut conn, &*decoder).expect("record");
        let found: usize = values.iter().map(|(_, last, dob)| usize::from(!last.starts_with("plain:")) + usize::from(dob.is_some())).sum();
        assert_eq!((recorded.recognised, recorded.recorded), (found as u64, found as u64), "{recorded}");

        // The dry run: every value found, the bad ones counted, nothing written.
        let bad: Vec<(&str, usize)> = $bad; // (row, owner index)
        let dry = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options.clone().dry_run(true)).expect("dry run");
        assert_eq!(dry.legacy.len(), 1, "{dry}");
        let count = dry.legacy[0];
        assert_eq!((count.format, count.found, count.failed), ($format, found as u64, bad.len() as u64), "{dry}");
        assert_eq!((dry.rows, dry.undecodable), ((values.len() - bad.len()) as u64, bad.len() as u64), "{dry}");
        assert!(dry.to_string().contains(&format!("{}: {found} value(s), {} do not open", $format, bad.len())), "{dry}");
        for (p, (row, _)) in dry.problems.iter().zip(&bad) {
            assert_eq!((p.column, p.row_key.as_str(), p.kind), ("last", *row, migrate::ProblemKind::Unreadable), "{p}");
        }

        // Verify: the rows that do not open fail.
        let verified = migrate::verify::<Imported, _>(&mut conn, &keyring, &VerifyOptions::default().legacy(decoder.clone())).expect("verify");
        assert_eq!((verified.failed, verified.unsealed), (bad.len() as u64, values.len() as u64), "{verified}");
        assert_eq!(verified.legacy, dry.legacy);
        // Without the decoder the tokens are taken as plain text: as text
        // they decode, as dates they do not.
        let plain = migrate::verify::<Imported, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
        assert!(plain.legacy.is_empty() && plain.failed == 1, "{plain}");
        assert!(
            plain.failures.iter().all(|f| f.column == "dob" || f.kind == migrate::ProblemKind::LegacyAsText),
            "{plain}"
        );
        assert_eq!(plain.legacy_as_text, found as u64, "recorded, but no decoder given: {plain}");

        // The backfill, two rows a batch: the first batches are sealed, the
        // one holding the first bad value is rolled back whole.
        let (bad_row, bad_owner) = bad[0];
        let err = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect_err("a value that does not open");
        let msg = chain(&err);
        assert!(matches!(&err, Error::Legacy { table: t, column, row, owner, .. }
            if *t == table && column == "last" && row == bad_row && *owner == owners[bad_owner]), "{err:?}");
        assert_eq!(err.kind(), phi::ErrorKind::Tampered);
        assert!(msg.contains(&table) && msg.contains(bad_row) && msg.contains(&owners[bad_owner]) && msg.contains($format), "{msg}");
        for r in &raw {
            assert!(!msg.contains(std::str::from_utf8(&r.last).expect("text")), "{msg}");
        }
        let position = values.iter().position(|(id, _, _)| *id == bad_row).expect("bad row");
        let sealed_before = position / 2 * 2;
        let flags: Vec<bool> = $module::$t::table
            .order($module::$t::id)
            .select($module::$t::sealed)
            .load(&mut conn)
            .expect("flags");
        assert_eq!(flags, (0..values.len()).map(|i| i < sealed_before).collect::<Vec<_>>(), "only whole batches before the bad one");

        // The bad values replaced by the application: the backfill goes on.
        let fix = |conn: &mut Conn| {
            for (row, _) in &bad {
                diesel::update($module::$t::table.find(*row))
                    .set($module::$t::last.eq(b"Replaced".to_vec()))
                    .execute(conn)
                    .expect("replace");
            }
        };
        fix(&mut conn);
        let report = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect("backfill");
        assert_eq!(report.remaining, 0, "{report}");
        assert_eq!(report.rows, (values.len() - sealed_before) as u64, "{report}");
        assert!(report.legacy.iter().all(|c| c.failed == 0), "{report}");
        let verified = migrate::verify::<Imported, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
        assert!(verified.is_ok() && verified.sealed == values.len() as u64, "{verified}");

        // Every value is the plaintext Python encrypted, sealed by phi.
        let loaded = Imported::load($module::$t::table.order($module::$t::id), &mut conn, &keyring).expect("load");
        for (case, (id, last, dob)) in loaded.iter().zip(&values) {
            assert_eq!(case.id, *id);
            let expected_last = if bad.iter().any(|(b, _)| b == id) {
                "Replaced".to_owned()
            } else if let Some(p) = last.strip_prefix("plain:") {
                p.to_owned()
            } else {
                fixture(&all, $fixture, last).1.expect("plain")
            };
            assert_eq!(case.last, expected_last, "{id}");
            let expected_dob = dob.map(|d| NaiveDate::parse_from_str(&fixture(&all, $fixture, d).1.expect("plain"), "%Y-%m-%d").expect("date"));
            assert_eq!(case.dob, expected_dob, "{id}");
            assert!(case.sealed);
        }
        let stored: Vec<Vec<u8>> = $module::$t::table.select($module::$t::last).load(&mut conn).expect("raw");
        assert!(stored.iter().all(|v| v.starts_with(&[0xF1, 0x01])), "envelopes only");
    }};
}

#[cfg(feature = "legacy-fernet")]
#[test]
fn fernet_tokens_under_primary_and_fallback_keys_are_sealed_under_phi() {
    let all = fixtures();
    let keys = &all["fernet_keys"];
    let decoder = || {
        legacy::FernetDecoder::new(keys["primary"].as_str().expect("key"))
            .and_then(|d| d.fallback(keys["fallback"].as_str().expect("key")))
            .expect("Fernet keys")
    };
    check_decoder(
        &decoder(),
        &all,
        "fernet",
        &[("tampered", LegacyErrorKind::Authentication), ("unknown_key", LegacyErrorKind::Authentication)],
    );
    // The fallback key is needed for the token written under it.
    let primary_only = legacy::FernetDecoder::new(keys["primary"].as_str().expect("key")).expect("key");
    let (token, _) = fixture(&all, "fernet", "fallback");
    assert_eq!(
        primary_only.open(&LegacyValue::new("t", "c", "o", "r", &token)).expect_err("no fallback").kind,
        LegacyErrorKind::Authentication
    );
    assert!(legacy::FernetDecoder::new("not a key").is_err());
    assert!(!format!("{:?}", decoder()).contains(keys["primary"].as_str().expect("key")));

    backfill_imported!(
        fernet_table,
        phi_it_lg_fernet,
        decoder(),
        "fernet",
        "fernet",
        vec![
            ("F-1", "primary", Some("primary_date")),
            ("F-2", "fallback", None),
            ("F-3", "plain:Okafor", None),
            ("F-4", "tampered", None),
            ("F-5", "unknown_key", None),
        ],
        vec![("F-4", 1), ("F-5", 0)]
    );
}

#[test]
fn versioned_gcm_texts_are_sealed_under_phi() {
    let all = fixtures();
    check_decoder(
        &gcm_decoder(&all),
        &all,
        "gcm",
        &[("tampered", LegacyErrorKind::Authentication), ("unknown_version", LegacyErrorKind::UnknownKeyVersion("v3".into()))],
    );
    assert_eq!(format!("{:?}", gcm_decoder(&all)), r#"VersionedGcmDecoder { versions: ["v1", "v2"], .. }"#);

    backfill_imported!(
        gcm_table,
        phi_it_lg_gcm,
        gcm_decoder(&all),
        "aes-gcm-versioned",
        "gcm",
        vec![
            ("G-1", "v1", Some("v2_date")),
            ("G-2", "v2", None),
            ("G-3", "v1_tag_apart", None),
            ("G-4", "plain:Okafor", None),
            ("G-5", "tampered", None),
            ("G-6", "unknown_version", None),
        ],
        vec![("G-5", 0), ("G-6", 1)]
    );
}

/// Strict mode: once a table is strict, phi refuses to read a row whose
/// flag is off, to write one, and to unseal the table.
#[test]
fn strict_tables_refuse_flag_off_rows_on_read_and_write() {
    use strict_table::{Imported, RawImported, phi_it_lg_strict as t};
    let db = TestDb::new();
    let mut conn = db.conn();
    create_imported(&mut conn, "phi_it_lg_strict");
    let owner = common::unique_owner("lgstrict");
    let row = |id: &str, last: &str| Imported {
        id: id.to_owned(),
        owner_id: owner.clone(),
        last: last.to_owned(),
        dob: NaiveDate::from_ymd_opt(1980, 1, 15),
        sealed: false,
    };
    let plain = db.keyring();
    plain.set_rollout(Rollout::Nobody);
    let stored = Imported::seal_all(&[row("S-1", "Doe"), row("S-2", "Roe")], &plain).expect("unsealed");
    diesel::insert_into(t::table).values(&stored).execute(&mut conn).expect("insert");
    let old = Imported::load(t::table.find("S-1"), &mut conn, &plain).expect("a flag-off row reads while not strict");
    let old = old.into_iter().next().expect("S-1");

    let keyring = db.keyring();
    assert!(!keyring.is_strict("phi_it_lg_strict"));
    keyring.set_strict(["phi_it_lg_strict"]);
    assert_eq!(keyring.strict_tables(), ["phi_it_lg_strict"]);

    // A read of a flag-off row: an error naming table, flag column, row, owner.
    let err = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect_err("strict read");
    assert!(matches!(&err, Error::Strict { operation: "reading", table, column, row, owner }
        if table == "phi_it_lg_strict" && column == "sealed" && row == "S-1" && *owner == owner_of(&old)), "{err:?}");
    assert_eq!(err.kind(), phi::ErrorKind::Refused);
    let msg = err.to_string();
    assert!(msg.contains("phi_it_lg_strict") && msg.contains("sealed") && msg.contains("S-1") && !msg.contains("Doe"), "{msg}");
    let sealed_rows: Vec<<Imported as PhiRecord>::Sealed> = t::table.order(t::id).select(<Imported as PhiRecord>::Sealed::as_select()).load(&mut conn).expect("rows");
    let each = Imported::open_each(sealed_rows, &keyring).expect("keys");
    assert!(each.iter().all(|r| matches!(r, Err(Error::Strict { .. }))), "every flag-off row refused");

    // A write that would store a flag-off row (the roll-out does not cover
    // the owner): refused, nothing written.
    keyring.set_rollout(Rollout::Nobody);
    let err = Imported::seal_all(&[row("S-3", "Poe")], &keyring).expect_err("strict insert");
    assert!(matches!(&err, Error::Strict { operation: "writing", row, column, .. } if row == "S-3" && column == "sealed"), "{err:?}");
    let mut edited = old.clone();
    edited.last = "Doe-Smith".into();
    let err = edited.update(&old, &keyring, &mut conn).expect_err("strict update");
    assert!(matches!(&err, Error::Strict { operation: "writing", table, row, .. } if table == "phi_it_lg_strict" && row == "S-1"), "{err:?}");
    let raw_last: Vec<u8> = t::table.find("S-1").select(t::last).first(&mut conn).expect("raw");
    assert_eq!(raw_last, b"Doe", "nothing written");

    // With the roll-out covering the owner, writes seal; the backfill seals
    // the rest; then every row reads.
    keyring.set_rollout(Rollout::All);
    assert_eq!(edited.update(&old, &keyring, &mut conn).expect("update"), Updated::Applied { sealed: true });
    let report = migrate::backfill::<Imported, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("backfill");
    assert_eq!((report.rows, report.remaining), (1, 0), "{report}");
    let loaded = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect("strict reads of sealed rows");
    assert_eq!(loaded.iter().map(|c| c.last.as_str()).collect::<Vec<_>>(), ["Doe-Smith", "Roe"]);

    // The rollback is refused while strict: nothing unsealed.
    let err = migrate::decrypt_back::<Imported, _>(&mut conn, &keyring, &MigrateOptions::default()).expect_err("strict");
    assert!(matches!(&err, Error::Strict { operation: "unsealing", row, .. } if row == "S-1"), "{err:?}");
    let unsealed: i64 = t::table.filter(t::sealed.eq(false)).count().get_result(&mut conn).expect("count");
    assert_eq!(unsealed, 0);
    // Not strict any more: it goes through.
    keyring.set_strict(Vec::<String>::new());
    keyring.set_rollout(Rollout::Nobody);
    let back = migrate::decrypt_back::<Imported, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("decrypt back");
    assert_eq!(back.rows, 2);
    let _ = RawImported { id: String::new(), owner_id: String::new(), last: Vec::new(), dob: None, sealed: false };
}

fn owner_of(case: &strict_table::Imported) -> String {
    case.owner_id.clone()
}

/// The database's own guard: a sealed row's values must be envelopes.
#[test]
fn sealed_check_makes_the_database_refuse_plaintext_in_a_sealed_row() {
    use check_table::{Imported, RawImported, phi_it_lg_check as t};
    let dialect = if BLOB == "BYTEA" {
        Dialect::Postgres
    } else if server_url().is_some() {
        Dialect::Mysql
    } else {
        Dialect::Sqlite
    };
    let db = TestDb::new();
    let mut conn = db.conn();
    create_imported(&mut conn, "phi_it_lg_check");
    let check = legacy::sealed_check::<Imported>(dialect).expect("check SQL");
    assert_eq!(check.name, "phi_sealed_phi_it_lg_check");
    for statement in &check.up {
        diesel::sql_query(statement).execute(&mut conn).unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let owner = common::unique_owner("lgcheck");
    let raw = |id: &str, last: &[u8], dob: Option<&[u8]>, sealed: bool| RawImported {
        id: id.to_owned(),
        owner_id: owner.clone(),
        last: last.to_vec(),
        dob: dob.map(<[u8]>::to_vec),
        sealed,
    };
    // Plaintext with the flag off: accepted (a row not yet backfilled).
    diesel::insert_into(t::table).values(raw("C-1", b"Doe", None, false)).execute(&mut conn).expect("flag off");
    // Plaintext in a sealed row, by a client that is not phi: refused.
    let refused = diesel::insert_into(t::table).values(raw("C-2", b"Doe", None, true)).execute(&mut conn);
    assert!(refused.is_err(), "{dialect:?}: plaintext in a sealed row was accepted");
    let refused = diesel::insert_into(t::table).values(raw("C-3", &[0xF1, 0x01, 0], Some(b"1980-01-15"), true)).execute(&mut conn);
    assert!(refused.is_err(), "{dialect:?}: a plaintext date in a sealed row was accepted");
    // phi's sealed rows pass, as does the backfill.
    let keyring = db.keyring();
    let case = Imported { id: "C-4".into(), owner_id: owner.clone(), last: "Roe".into(), dob: None, sealed: false };
    diesel::insert_into(t::table).values(case.seal(&keyring).expect("seal")).execute(&mut conn).expect("a sealed row");
    let report = migrate::backfill::<Imported, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("backfill");
    assert_eq!(report.rows, 1);
    // Writing plaintext over a sealed value: refused.
    let refused = diesel::update(t::table.find("C-4")).set(t::last.eq(b"Roe".to_vec())).execute(&mut conn);
    assert!(refused.is_err(), "{dialect:?}: an update to plaintext in a sealed row was accepted");
    let loaded = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect("load");
    assert_eq!(loaded.iter().map(|c| c.last.as_str()).collect::<Vec<_>>(), ["Doe", "Roe"]);
    // The down statements remove the guard.
    for statement in &check.down {
        diesel::sql_query(statement).execute(&mut conn).unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    diesel::insert_into(t::table).values(raw("C-5", b"Doe", None, true)).execute(&mut conn).expect("no guard any more");
}

/// The records of `table` left in `phi_legacy_values`.
fn records_left(conn: &mut Conn, table: &str) -> i64 {
    use phi::schema::phi_legacy_values as lv;
    lv::table.filter(lv::table_name.eq(table)).count().get_result(conn).expect("records")
}

/// Legacy import is not a decryption oracle: owner A's legacy token,
/// copied by an application write into owner B's row (an existing row, a
/// new one, and a new row reusing the key of A's deleted row), is sealed as
/// the token text it is, never decoded into A's plaintext; A's own
/// recorded values are imported; plain text that merely looks legacy is
/// counted, reported, and sealed as it is, and the backfill completes.
#[test]
fn a_copied_legacy_token_is_never_decoded_into_another_owners_row() {
    use oracle_table::{Imported, RawImported, phi_it_lg_oracle as t};
    let db = TestDb::new();
    let mut conn = db.conn();
    create_imported(&mut conn, "phi_it_lg_oracle");
    let all = fixtures();
    let (a, b) = (common::unique_owner("lgoracleA"), common::unique_owner("lgoracleB"));
    let (nwosu_token, nwosu) = fixture(&all, "gcm", "v1");
    let (zhang_token, zhang) = fixture(&all, "gcm", "v2");
    let (date_token, _) = fixture(&all, "gcm", "v2_date");
    let (nwosu, zhang) = (nwosu.expect("plain"), zhang.expect("plain"));
    let text = |v: &[u8]| String::from_utf8(v.to_vec()).expect("text");

    // Before phi: A's values encrypted by the old application; a note of
    // B's that merely looks like a versioned ciphertext.
    let raw = |id: &str, owner: &str, last: &[u8], dob: Option<&[u8]>| RawImported {
        id: id.into(),
        owner_id: owner.into(),
        last: last.to_vec(),
        dob: dob.map(<[u8]>::to_vec),
        sealed: false,
    };
    diesel::insert_into(t::table)
        .values(&vec![
            raw("O-1", &a, &nwosu_token, Some(&date_token)),
            raw("O-2", &b, b"Okafor", None),
            raw("O-3", &a, &zhang_token, None),
            raw("O-4", &b, b"v1:Follow:Up", None),
        ])
        .execute(&mut conn)
        .expect("legacy rows");
    let decoder: Arc<dyn LegacyDecoder> = Arc::new(gcm_decoder(&all));
    let recorded = migrate::record_legacy::<Imported, _>(&mut conn, &*decoder).expect("record");
    assert_eq!((recorded.rows, recorded.recognised, recorded.recorded), (4, 4, 4), "{recorded}");

    // phi's writers run (sealing nobody yet): B pastes A's tokens into
    // fields of B's own, through the application.
    let keyring = db.keyring();
    keyring.set_rollout(Rollout::Nobody);
    let old_o2 = Imported::load(t::table.find("O-2"), &mut conn, &keyring).expect("O-2").remove(0);
    let mut o2 = old_o2.clone();
    o2.last = text(&nwosu_token);
    assert_eq!(o2.update(&old_o2, &keyring, &mut conn).expect("update"), Updated::Applied { sealed: false });
    // A's row O-3 is deleted; B's new row reuses its key, with A's token.
    diesel::delete(t::table.find("O-3")).execute(&mut conn).expect("delete");
    let row = |id: &str, last: String| Imported { id: id.into(), owner_id: b.clone(), last, dob: None, sealed: false };
    let rows = Imported::seal_all(
        &[row("O-3", text(&zhang_token)), row("O-5", text(&nwosu_token)), row("O-6", "v1:Follow:Up".into())],
        &keyring,
    )
    .expect("flag-off rows");
    diesel::insert_into(t::table).values(&rows).execute(&mut conn).expect("insert");
    let options = MigrateOptions::default().batch(2).legacy(decoder.clone());

    // The dry run: 2 recorded values open; 5 look legacy and are not
    // (or not well-formed) records: reported, not failures.
    let dry = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options.clone().dry_run(true)).expect("dry run");
    assert_eq!((dry.rows, dry.undecodable, dry.legacy_as_text), (6, 0, 5), "{dry}");
    assert_eq!(dry.legacy.iter().map(|c| (c.format, c.found, c.failed)).collect::<Vec<_>>(), [("aes-gcm-versioned", 2, 0)], "{dry}");
    let verified = migrate::verify::<Imported, _>(&mut conn, &keyring, &VerifyOptions::default().legacy(decoder.clone())).expect("verify");
    assert!(verified.is_ok() && verified.legacy_as_text == 5, "notices, not failures: {verified}");

    // The backfill completes.
    keyring.set_rollout(Rollout::All);
    let report = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect("backfill");
    assert_eq!((report.rows, report.remaining, report.legacy_as_text), (6, 0, 5), "{report}");
    assert_eq!(report.legacy.iter().map(|c| (c.format, c.found)).collect::<Vec<_>>(), [("aes-gcm-versioned", 2)], "{report}");
    let mut named: Vec<(&str, &str)> = report
        .problems
        .iter()
        .filter(|p| p.kind == migrate::ProblemKind::LegacyAsText)
        .map(|p| (p.row_key.as_str(), p.column))
        .collect();
    named.sort_unstable();
    assert_eq!(named, [("O-2", "last"), ("O-3", "last"), ("O-4", "last"), ("O-5", "last"), ("O-6", "last")], "{report}");
    let shown = report.to_string();
    assert!(shown.contains("Sealed 5 value(s) that look legacy") && shown.contains("O-5"), "{shown}");
    assert!(!shown.contains(&nwosu) && !shown.contains(&text(&nwosu_token)), "{shown}");

    // B's rows hold the token text, sealed; never A's plaintext.
    let loaded = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect("load");
    let by_id = |id: &str| loaded.iter().find(|c| c.id == id).expect(id);
    assert!(loaded.iter().all(|c| c.sealed));
    assert_eq!((by_id("O-1").last.as_str(), by_id("O-1").dob), (nwosu.as_str(), NaiveDate::from_ymd_opt(1975, 6, 30)));
    assert_eq!(by_id("O-2").last, text(&nwosu_token));
    assert_eq!(by_id("O-3").last, text(&zhang_token));
    assert_eq!(by_id("O-5").last, text(&nwosu_token));
    for c in loaded.iter().filter(|c| c.owner_id == b) {
        assert!(c.last != nwosu && c.last != zhang, "{}: A's plaintext in B's row", c.id);
    }
    assert_eq!((by_id("O-4").last.as_str(), by_id("O-6").last.as_str()), ("v1:Follow:Up", "v1:Follow:Up"));
    assert_eq!(records_left(&mut conn, "phi_it_lg_oracle"), 0, "records go with their rows' backfill");

    // Decrypt-back writes the imported plaintext, not the token, and a
    // second backfill finds no record to decode.
    keyring.set_rollout(Rollout::Nobody);
    let back = migrate::decrypt_back::<Imported, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("back");
    assert_eq!(back.rows, 6);
    let o1: Vec<u8> = t::table.find("O-1").select(t::last).first(&mut conn).expect("O-1");
    assert_eq!(o1, nwosu.as_bytes());
    keyring.set_rollout(Rollout::All);
    let again = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect("backfill again");
    assert_eq!((again.rows, again.legacy_as_text), (6, 5), "{again}");
    assert!(again.legacy.is_empty(), "{again}");
    let loaded = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect("load");
    assert_eq!(loaded.iter().map(|c| c.last.clone()).collect::<Vec<_>>()[..3], [nwosu.clone(), text(&nwosu_token), text(&zhang_token)]);

    // Recording once phi has sealed rows is refused.
    let err = migrate::record_legacy::<Imported, _>(&mut conn, &*decoder).expect_err("sealed rows");
    assert_eq!(err.kind(), phi::ErrorKind::Refused, "{err}");
}

/// The statements of `legacy::record_sql` (those the generated migrations
/// end with) record the shipped formats' values on every backend; the
/// backfill then imports them.
#[test]
fn the_generated_recording_sql_records_what_the_backfill_imports() {
    use recorded_sql_table::{Imported, RawImported, phi_it_lg_recsql as t};
    let dialect = if BLOB == "BYTEA" {
        Dialect::Postgres
    } else if server_url().is_some() {
        Dialect::Mysql
    } else {
        Dialect::Sqlite
    };
    let db = TestDb::new();
    let mut conn = db.conn();
    create_imported(&mut conn, "phi_it_lg_recsql");
    let all = fixtures();
    let owner = common::unique_owner("lgrecsql");
    let (token, plain) = fixture(&all, "gcm", "v1_tag_apart");
    let raw = |id: &str, last: &[u8]| RawImported { id: id.into(), owner_id: owner.clone(), last: last.to_vec(), dob: None, sealed: false };
    diesel::insert_into(t::table).values(&vec![raw("R-1", &token), raw("R-2", b"Doe")]).execute(&mut conn).expect("rows");
    for statement in legacy::record_sql::<Imported>(dialect).expect("SQL") {
        diesel::sql_query(&statement).execute(&mut conn).unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    assert_eq!(records_left(&mut conn, "phi_it_lg_recsql"), 1);
    let keyring = db.keyring();
    let options = MigrateOptions::default().legacy(Arc::new(gcm_decoder(&all)));
    let report = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect("backfill");
    assert_eq!((report.rows, report.legacy_as_text), (2, 0), "{report}");
    let loaded = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect("load");
    assert_eq!(loaded[0].last, plain.expect("plain"));
    assert_eq!(records_left(&mut conn, "phi_it_lg_recsql"), 0);
}

/// Fernet tokens as Python writes and reads them: URL-safe (`-`, `_`), in
/// the standard alphabet, and wrapped with `\n` or `\r\n`: recognised,
/// recorded and imported.
#[cfg(feature = "legacy-fernet")]
#[test]
fn url_safe_and_line_wrapped_fernet_tokens_are_imported() {
    use wrapped_table::{Imported, RawImported, phi_it_lg_wrapped as t};
    let db = TestDb::new();
    let mut conn = db.conn();
    create_imported(&mut conn, "phi_it_lg_wrapped");
    let all = fixtures();
    let decoder = legacy::FernetDecoder::new(all["fernet_keys"]["primary"].as_str().expect("key")).expect("key");
    let owner = common::unique_owner("lgwrapped");
    let names = ["url_safe", "standard_alphabet", "wrapped_lf", "wrapped_crlf"];
    let rows: Vec<RawImported> = names
        .iter()
        .enumerate()
        .map(|(i, name)| RawImported {
            id: format!("W-{i}"),
            owner_id: owner.clone(),
            last: fixture(&all, "fernet", name).0,
            dob: None,
            sealed: false,
        })
        .collect();
    let (url_safe, _) = fixture(&all, "fernet", "url_safe");
    assert!(url_safe.contains(&b'-') && url_safe.contains(&b'_'));
    assert!(fixture(&all, "fernet", "wrapped_crlf").0.windows(2).any(|w| w == b"\r\n"));
    diesel::insert_into(t::table).values(&rows).execute(&mut conn).expect("rows");
    let recorded = migrate::record_legacy::<Imported, _>(&mut conn, &decoder).expect("record");
    assert_eq!(recorded.recorded, 4, "{recorded}");
    let keyring = db.keyring();
    let options = MigrateOptions::default().legacy(Arc::new(decoder));
    let report = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect("backfill");
    assert_eq!((report.rows, report.legacy_as_text), (4, 0), "{report}");
    assert_eq!(report.legacy.iter().map(|c| (c.format, c.found)).collect::<Vec<_>>(), [("fernet", 4)]);
    let loaded = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect("load");
    for (case, name) in loaded.iter().zip(names) {
        assert_eq!(case.last, fixture(&all, "fernet", name).1.expect("plain"), "{name}");
    }
}

/// Counts `phi_legacy_reads_total` for one table (a recorder of the test's
/// thread only: loads of fewer than 512 rows count on the calling thread).
#[cfg(feature = "legacy-fernet")]
struct LegacyReads {
    table: &'static str,
    count: Arc<std::sync::atomic::AtomicU64>,
}

#[cfg(feature = "legacy-fernet")]
impl LegacyReads {
    /// The values `f` read as legacy.
    fn during<T>(table: &'static str, f: impl FnOnce() -> T) -> (T, u64) {
        let recorder = LegacyReads { table, count: Arc::default() };
        let out = metrics::with_local_recorder(&recorder, f);
        (out, recorder.count.load(std::sync::atomic::Ordering::SeqCst))
    }
}

#[cfg(feature = "legacy-fernet")]
impl metrics::Recorder for LegacyReads {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == "phi_legacy_reads_total" && key.labels().any(|l| l.key() == "table" && l.value() == self.table) {
            metrics::Counter::from_arc(self.count.clone())
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A connection that counts its statements reading `phi_legacy_values`.
#[cfg(feature = "legacy-fernet")]
fn counting_records_queries(db: &TestDb) -> (Conn, Arc<std::sync::atomic::AtomicUsize>) {
    let mut conn = db.conn();
    let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = queries.clone();
    conn.set_instrumentation(move |event: diesel::connection::InstrumentationEvent<'_>| {
        if let diesel::connection::InstrumentationEvent::StartQuery { query, .. } = event
            && query.to_string().contains("phi_legacy_values")
        {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (conn, queries)
}

/// During the roll-out, with the Fernet decoder on the keyring, `load`
/// returns the plaintext Python encrypted for every recorded value: before
/// the backfill, while it is part-way (sealed and legacy rows side by
/// side), and after it, the same each time. A token pasted into another
/// owner's row after the recording reads as the text it is; a recorded
/// token that does not open fails the load with an error naming the
/// table, column, row and owner. Reads of legacy values are counted, and
/// the records are read with one query per load only when a row holds a
/// value the decoder recognises.
#[cfg(feature = "legacy-fernet")]
#[test]
fn fernet_values_read_the_same_before_during_and_after_the_backfill() {
    use reads_table::{Imported, RawImported, phi_it_lg_reads as t};
    const TABLE: &str = "phi_it_lg_reads";
    let db = TestDb::new();
    let mut conn = db.conn();
    create_imported(&mut conn, TABLE);
    let all = fixtures();
    let keys = &all["fernet_keys"];
    let decoder: Arc<dyn LegacyDecoder> = Arc::new(
        legacy::FernetDecoder::new(keys["primary"].as_str().expect("key"))
            .and_then(|d| d.fallback(keys["fallback"].as_str().expect("key")))
            .expect("Fernet keys"),
    );
    let (a, b) = (common::unique_owner("lgreadsA"), common::unique_owner("lgreadsB"));
    let (doe_token, doe) = fixture(&all, "fernet", "primary");
    let (date_token, date) = fixture(&all, "fernet", "primary_date");
    let (garcia_token, garcia) = fixture(&all, "fernet", "fallback");
    let (tampered, _) = fixture(&all, "fernet", "tampered");
    let (doe, garcia) = (doe.expect("plain"), garcia.expect("plain"));
    let dob = NaiveDate::parse_from_str(&date.expect("plain"), "%Y-%m-%d").expect("date");
    let text = |v: &[u8]| String::from_utf8(v.to_vec()).expect("text");
    let raw = |id: &str, owner: &str, last: &[u8], dob: Option<&[u8]>| RawImported {
        id: id.into(),
        owner_id: owner.into(),
        last: last.to_vec(),
        dob: dob.map(<[u8]>::to_vec),
        sealed: false,
    };

    // Before phi: values the old application encrypted, one of them
    // tampered with since; one plain value; then the recording.
    diesel::insert_into(t::table)
        .values(&vec![
            raw("R-1", &a, &doe_token, Some(&date_token)),
            raw("R-2", &b, &garcia_token, None),
            raw("R-3", &a, b"Okafor", None),
            raw("R-5", &a, &tampered, None),
            raw("R-6", &b, &doe_token, None),
        ])
        .execute(&mut conn)
        .expect("legacy rows");
    let recorded = migrate::record_legacy::<Imported, _>(&mut conn, &*decoder).expect("record");
    assert_eq!(recorded.recorded, 5, "{recorded}");
    // After the recording, B's new row holds a copy of A's token.
    diesel::insert_into(t::table).values(&raw("R-4", &b, &doe_token, None)).execute(&mut conn).expect("pasted token");

    // Without a decoder on the keyring the token is read as its text, and
    // no record is read.
    let (mut counting, queries) = counting_records_queries(&db);
    let plain = db.keyring();
    let r2 = Imported::load(t::table.find("R-2"), &mut counting, &plain).expect("R-2").remove(0);
    assert_eq!(r2.last, text(&garcia_token));
    assert_eq!(queries.load(std::sync::atomic::Ordering::SeqCst), 0);

    let keyring = Keyring::builder(db.store(), common::local_kek())
        .actor("integration-test")
        .legacy(decoder.clone())
        .build()
        .expect("keyring");
    // Rows with no value the decoder recognises cost no query.
    let r3 = Imported::load(t::table.find("R-3"), &mut counting, &keyring).expect("R-3").remove(0);
    assert_eq!(r3.last, "Okafor");
    assert_eq!(queries.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The recorded token that does not open: the load fails, naming where.
    let err = Imported::load(t::table.order(t::id), &mut conn, &keyring).expect_err("tampered");
    assert!(matches!(&err, Error::Legacy { table, column, row, owner, .. }
        if table == TABLE && column == "last" && row == "R-5" && *owner == a), "{err:?}");
    let msg = chain(&err);
    assert!(msg.contains(TABLE) && msg.contains("R-5") && msg.contains(&a) && msg.contains("fernet"), "{msg}");
    assert!(!msg.contains(&text(&tampered)) && !msg.contains(&doe), "{msg}");

    let pasted = text(&doe_token);
    let expected = |r5: Option<&str>| -> Vec<(String, String, Option<NaiveDate>)> {
        let mut rows = vec![
            ("R-1", doe.clone(), Some(dob)),
            ("R-2", garcia.clone(), None),
            ("R-3", "Okafor".to_owned(), None),
            ("R-4", pasted.clone(), None),
        ];
        if let Some(r5) = r5 {
            rows.push(("R-5", r5.to_owned(), None));
        }
        rows.push(("R-6", doe.clone(), None));
        rows.into_iter().map(|(id, last, dob)| (id.to_owned(), last, dob)).collect()
    };
    let read = |conn: &mut Conn, with_r5: bool| -> Vec<(String, String, Option<NaiveDate>)> {
        let query = t::table.filter(t::id.ne(if with_r5 { "" } else { "R-5" })).order(t::id);
        Imported::load(query, conn, &keyring)
            .expect("load")
            .into_iter()
            .map(|c| (c.id, c.last, c.dob))
            .collect()
    };

    // Before the backfill: every recorded value opened (4), one query.
    let (before, reads) = LegacyReads::during(TABLE, || read(&mut counting, false));
    assert_eq!(before, expected(None));
    assert_eq!(reads, 4);
    assert_eq!(queries.load(std::sync::atomic::Ordering::SeqCst), 1, "one records query for the chunk");

    // The backfill, two rows a batch, with the keyring's decoder: R-1 to
    // R-4 are sealed, the batch of R-5 and R-6 is rolled back at R-5.
    let options = MigrateOptions::default().batch(2);
    let err = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect_err("R-5");
    assert!(matches!(&err, Error::Legacy { row, .. } if row == "R-5"), "{err:?}");
    let flags: Vec<bool> = t::table.order(t::id).select(t::sealed).load(&mut conn).expect("flags");
    assert_eq!(flags, [true, true, true, true, false, false]);
    assert_eq!(records_left(&mut conn, TABLE), 2, "R-5's and R-6's records remain");

    // During: sealed rows read under phi's keys, R-6 still as legacy.
    let (during, reads) = LegacyReads::during(TABLE, || read(&mut conn, false));
    assert_eq!(during, expected(None));
    assert_eq!(reads, 1);

    // The application replaces R-5's value; the backfill completes.
    diesel::update(t::table.find("R-5")).set(t::last.eq(b"Replaced".to_vec())).execute(&mut conn).expect("replace");
    let report = migrate::backfill::<Imported, _>(&mut conn, &keyring, &options).expect("backfill");
    assert_eq!((report.rows, report.remaining), (2, 0), "{report}");
    assert_eq!(records_left(&mut conn, TABLE), 0);

    // After: the same plaintext, none of it legacy, no records query.
    queries.store(0, std::sync::atomic::Ordering::SeqCst);
    let (after, reads) = LegacyReads::during(TABLE, || read(&mut counting, true));
    assert_eq!(after, expected(Some("Replaced")));
    assert_eq!(reads, 0);
    assert_eq!(queries.load(std::sync::atomic::Ordering::SeqCst), 0);
    let stored: Vec<Vec<u8>> = t::table.select(t::last).load(&mut conn).expect("raw");
    assert!(stored.iter().all(|v| v.starts_with(&[0xF1, 0x01])), "envelopes only");

    // A recorded token whose plaintext is not the field's encoding (a
    // name in the date column): an error naming where, not the value.
    diesel::insert_into(t::table).values(&raw("R-7", &a, b"Okafor", Some(&doe_token))).execute(&mut conn).expect("R-7");
    {
        use phi::schema::phi_legacy_values as lv;
        diesel::insert_into(lv::table)
            .values((lv::table_name.eq(TABLE), lv::column_name.eq("dob"), lv::row_key.eq("R-7"), lv::owner_id.eq(&a), lv::stored.eq(&doe_token)))
            .execute(&mut conn)
            .expect("record");
    }
    let err = Imported::load(t::table.find("R-7"), &mut conn, &keyring).expect_err("not a date");
    assert!(matches!(&err, Error::DataTable { table, column, owner, .. } if table == TABLE && column == "dob" && *owner == a), "{err:?}");
    let msg = chain(&err);
    assert!(msg.contains("R-7") && !msg.contains(&doe) && !msg.contains(&pasted), "{msg}");
}

diesel::table! {
    phi_it_lg_shadow (id) {
        id -> Varchar,
        owner_id -> Varchar,
        last_name -> Varchar,
        nickname -> Nullable<Text>,
        last_name_encrypted -> Nullable<Binary>,
        nickname_encrypted -> Nullable<Binary>,
        sealed -> Bool,
    }
}

/// A table in its dual-write phase whose text columns hold versioned
/// AES-GCM texts of an earlier scheme.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_lg_shadow, crate = phi, debug)]
#[diesel(primary_key(id))]
struct ShadowImported {
    #[phi(row_key)]
    id: String,
    #[phi(owner)]
    owner_id: String,
    #[phi(encrypt, shadow)]
    last_name: String,
    #[phi(encrypt, shadow)]
    nickname: Option<String>,
    #[phi(encrypted_flag)]
    sealed: bool,
}

/// The read path on shadow columns (the plain column's text compared with
/// its record), with the versioned AES-GCM decoder: recorded texts read as
/// their plaintext before and after the backfill; a copied text and a
/// recorded note that is not well formed read as the text they are.
#[test]
fn versioned_gcm_texts_of_shadowed_columns_read_the_same_before_and_after_the_backfill() {
    use phi_it_lg_shadow as t;
    const TABLE: &str = "phi_it_lg_shadow";
    let db = TestDb::new();
    let mut conn = db.conn();
    diesel::sql_query(format!("DROP TABLE IF EXISTS {TABLE}")).execute(&mut conn).expect("drop");
    {
        use phi::schema::phi_legacy_values as lv;
        diesel::delete(lv::table.filter(lv::table_name.eq(TABLE))).execute(&mut conn).expect("old records");
    }
    diesel::sql_query(format!(
        "CREATE TABLE {TABLE} (id VARCHAR(64) NOT NULL PRIMARY KEY, owner_id VARCHAR(255) NOT NULL, \
         last_name VARCHAR(255) NULL, nickname TEXT NULL, last_name_encrypted {BLOB} NULL, \
         nickname_encrypted {BLOB} NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)"
    ))
    .execute(&mut conn)
    .expect("create");
    let all = fixtures();
    let text = |v: Vec<u8>| String::from_utf8(v).expect("text");
    let (nwosu_token, nwosu) = fixture(&all, "gcm", "v1");
    let (zhang_token, zhang) = fixture(&all, "gcm", "v2");
    let (nwosu_token, zhang_token) = (text(nwosu_token), text(zhang_token));
    let (a, b) = (common::unique_owner("lgshadowA"), common::unique_owner("lgshadowB"));
    let insert = |conn: &mut Conn, id: &str, owner: &str, last: &str, nick: Option<&str>| {
        diesel::insert_into(t::table)
            .values((t::id.eq(id), t::owner_id.eq(owner), t::last_name.eq(last), t::nickname.eq(nick), t::sealed.eq(false)))
            .execute(conn)
            .expect("legacy row");
    };
    insert(&mut conn, "X-1", &a, &nwosu_token, Some(&zhang_token));
    insert(&mut conn, "X-3", &b, "v1:Follow:Up", None);
    let decoder: Arc<dyn LegacyDecoder> = Arc::new(gcm_decoder(&all));
    // The statements the generated shadow migration ends with.
    let dialect = if server_url().is_none() {
        Dialect::Sqlite
    } else if BLOB == "BYTEA" {
        Dialect::Postgres
    } else {
        Dialect::Mysql
    };
    for statement in legacy::record_sql::<ShadowImported>(dialect).expect("recording SQL") {
        diesel::sql_query(statement).execute(&mut conn).expect("record");
    }
    assert_eq!(records_left(&mut conn, TABLE), 3, "X-1's two texts and X-3's note");
    // After the recording: B's row with a copy of A's text.
    insert(&mut conn, "X-2", &b, &nwosu_token, None);

    let keyring = Keyring::builder(db.store(), common::local_kek())
        .actor("integration-test")
        .legacy(decoder)
        .build()
        .expect("keyring");
    let expected = vec![
        ("X-1".to_owned(), nwosu.expect("plain"), zhang.clone()),
        ("X-2".to_owned(), nwosu_token.clone(), None),
        ("X-3".to_owned(), "v1:Follow:Up".to_owned(), None),
    ];
    let read = |conn: &mut Conn| -> Vec<(String, String, Option<String>)> {
        ShadowImported::load(t::table.order(t::id), conn, &keyring)
            .expect("load")
            .into_iter()
            .map(|c| (c.id, c.last_name, c.nickname))
            .collect()
    };
    assert_eq!(read(&mut conn), expected);

    let report = migrate::backfill::<ShadowImported, _>(&mut conn, &keyring, &MigrateOptions::default())
        .expect("backfill");
    assert_eq!((report.rows, report.remaining), (3, 0), "{report}");
    assert_eq!(records_left(&mut conn, TABLE), 0);
    let sealed: Vec<bool> = t::table.order(t::id).select(t::sealed).load(&mut conn).expect("flags");
    assert_eq!(sealed, [true, true, true]);
    assert_eq!(read(&mut conn), expected, "the same, read from the shadow columns");
}
