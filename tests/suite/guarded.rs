// Guarded updates racing the migration jobs and other writers, as fixed
// interleavings on two connections: the application reads a row, another
// connection commits (a backfill, a decrypt-back, a process with another
// roll-out), then the application writes. Included in `tests/suite/mod.rs`,
// so `Conn`, `BLOB`, `server_url()` and `TestDb` are in scope.
//
// A migration job works on a whole table, so each test has a table of its
// own (on a server, dropped and created again at its start), declared by
// `guarded_schema!` with the same columns, model and helpers.

use phi::migrate::{self, MigrateOptions, VerifyOptions};
use phi::{PhiRecord, Rollout, Updated};

const ENVELOPE: [u8; 2] = [0xF1, 0x01];

fn is_envelope(bytes: &[u8]) -> bool {
    bytes.get(..2) == Some(&ENVELOPE[..])
}

/// Declares the table `$table` (used as `t`), its model `Row` and helpers.
macro_rules! guarded_schema {
    ($table:ident) => {
        diesel::table! {
            $table (case_id) {
                case_id -> Varchar,
                user_id -> Varchar,
                patient_last -> Binary,
                patient_dob -> Binary,
                scan -> Nullable<Binary>,
                status -> Varchar,
                phi_encrypted -> Bool,
                patient_last_bidx -> Nullable<Binary>,
            }
        }
        use self::$table as t;

        /// A case with a text, a date and a nullable byte-string field (a
        /// `Vec<u8>` decodes from any bytes: an envelope in a flag-off row
        /// would read back as garbage, not as an error).
        #[derive(phi::PhiRecord, Clone, PartialEq)]
        #[phi(table = $table, crate = phi, debug)]
        #[diesel(primary_key(case_id))]
        struct Row {
            #[phi(row_key)]
            case_id: String,
            #[phi(owner)]
            user_id: String,
            #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
            patient_last: String,
            #[phi(encrypt)]
            patient_dob: NaiveDate,
            #[phi(encrypt)]
            scan: Option<Vec<u8>>,
            status: String,
            #[phi(encrypted_flag)]
            phi_encrypted: bool,
        }

        const TABLE: &str = stringify!($table);
        // Not every test looks a name up.
        const _: fn(&Keyring, &str, &str) -> phi::Result<Vec<Vec<u8>>> = Row::patient_last_blind_index;

        /// The table, empty; the application's connection.
        fn setup(db: &TestDb) -> Conn {
            let mut conn = db.conn();
            let index = if BLOB == "BYTEA" { "BYTEA" } else if server_url().is_some() { "VARBINARY(16)" } else { "BLOB" };
            diesel::sql_query(format!("DROP TABLE IF EXISTS {TABLE}")).execute(&mut conn).expect("drop");
            diesel::sql_query(format!(
                "CREATE TABLE {TABLE} (case_id VARCHAR(64) NOT NULL PRIMARY KEY, user_id VARCHAR(255) NOT NULL, \
                 patient_last {BLOB} NOT NULL, patient_dob {BLOB} NOT NULL, scan {BLOB} NULL, \
                 status VARCHAR(32) NOT NULL, phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE, patient_last_bidx {index} NULL)"
            ))
            .execute(&mut conn)
            .expect("create");
            conn
        }

        /// `G-1` … `G-n` of `owner`, inserted as `keyring`'s roll-out says.
        fn insert_rows(conn: &mut Conn, keyring: &Keyring, owner: &str, n: usize) -> Vec<Row> {
            let rows: Vec<Row> = (1..=n)
                .map(|i| Row {
                    case_id: format!("G-{i}"),
                    user_id: owner.to_owned(),
                    patient_last: format!("Doe{i}"),
                    patient_dob: NaiveDate::from_ymd_opt(1980, 1, 15).expect("date"),
                    scan: Some(vec![0x00, 0x7F, u8::try_from(i).expect("small")]),
                    status: "scheduled".to_owned(),
                    phi_encrypted: false,
                })
                .collect();
            let sealed = Row::seal_all(&rows, keyring).expect("seal");
            diesel::insert_into(t::table).values(&sealed).execute(conn).expect("insert");
            rows
        }

        fn load_one(conn: &mut Conn, keyring: &Keyring, id: &str) -> phi::Result<Row> {
            Row::load(t::table.filter(t::case_id.eq(id)), conn, keyring).map(|mut rows| rows.pop().expect("one row"))
        }

        /// The stored flag and the two edited columns' bytes.
        #[allow(dead_code)]
        fn raw(conn: &mut Conn, id: &str) -> (bool, Vec<u8>, Option<Vec<u8>>) {
            t::table
                .find(id)
                .select((t::phi_encrypted, t::patient_last, t::scan))
                .first(conn)
                .expect("raw row")
        }

        /// No sealed row holds a plain value, no plain row an envelope,
        /// and every row opens and verifies.
        fn assert_consistent(conn: &mut Conn, keyring: &Keyring) {
            let rows: Vec<(String, bool, Vec<u8>, Vec<u8>, Option<Vec<u8>>)> = t::table
                .select((t::case_id, t::phi_encrypted, t::patient_last, t::patient_dob, t::scan))
                .load(conn)
                .expect("raw rows");
            for (id, sealed, last, dob, scan) in rows {
                for (column, value) in [("patient_last", Some(last)), ("patient_dob", Some(dob)), ("scan", scan)] {
                    if let Some(value) = value {
                        assert_eq!(is_envelope(&value), sealed, "{TABLE}.{column} of {id}: flag {sealed}");
                    }
                }
            }
            let report = migrate::verify::<Row, _>(conn, keyring, &VerifyOptions::default()).expect("verify");
            assert!(report.is_ok(), "{report}");
            Row::load(t::table, conn, keyring).expect("every row opens");
        }
    };
}

mod backfill {
    use super::*;
    guarded_schema!(phi_it_guard_backfill);

    #[test]
    fn a_backfill_between_read_and_update_is_a_conflict_and_the_retry_lands_sealed() {
        let db = TestDb::new();
        let mut app = setup(&db);
        let mut job = db.conn();
        let owner = common::unique_owner("guard-backfill");
        // The owner is not in the application's roll-out: its writes to
        // an unsealed row stay plain.
        let keyring = db.keyring();
        keyring.set_rollout(Rollout::Nobody);
        let rows = insert_rows(&mut app, &keyring, &owner, 4);

        // 1. The application reads G-1 and G-2 (flag off) and edits them.
        let old = load_one(&mut app, &keyring, "G-1").expect("loads");
        assert!(!old.phi_encrypted);
        let mut edited = old.clone();
        edited.patient_last = "Okafor".to_owned();
        edited.scan = Some(b"edited".to_vec());
        let old2 = load_one(&mut app, &keyring, "G-2").expect("loads");
        let mut edited2 = old2.clone();
        edited2.patient_last = "Haddad".to_owned();
        let unguarded = edited2.changes(&old2, &keyring).expect("changes");

        // 2. A backfill seals every row and commits.
        let report = migrate::backfill::<Row, _>(&mut job, &db.keyring(), &MigrateOptions::default().batch(2))
            .expect("backfill");
        assert_eq!((report.rows, report.remaining), (4, 0), "{report}");

        // 3. The guarded update writes nothing and says why.
        assert_eq!(edited.update(&old, &keyring, &mut app).expect("update"), Updated::Conflict);
        let (sealed, last, scan) = raw(&mut app, "G-1");
        assert!(sealed && is_envelope(&last) && scan.as_deref().is_some_and(is_envelope));
        assert_eq!(load_one(&mut app, &keyring, "G-1").expect("still opens"), Row { phi_encrypted: true, ..rows[0].clone() });

        // What the unguarded changeset does in its place: a plain value in
        // a row marked sealed, which no longer loads, and which a backfill
        // no longer sees.
        let written = diesel::update(t::table.find("G-2")).set(&unguarded).execute(&mut app).expect("unguarded");
        assert_eq!(written, 1);
        assert_eq!(raw(&mut app, "G-2").1, b"Haddad".to_vec());
        let err = load_one(&mut app, &keyring, "G-2").expect_err("plain value in a sealed row");
        assert!(err.to_string().contains(&format!("{TABLE}.patient_last")), "{err}");
        let again = migrate::backfill::<Row, _>(&mut job, &keyring, &MigrateOptions::default()).expect("backfill");
        assert_eq!(again.rows, 0, "{again}");
        diesel::delete(t::table.find("G-2")).execute(&mut app).expect("delete the broken row");

        // 4. Reload, redo the edit, update: sealed (the row was), opens,
        // holds the edit, and the blind index finds it.
        let reloaded = load_one(&mut app, &keyring, "G-1").expect("reloads");
        assert!(reloaded.phi_encrypted);
        let mut edited = reloaded.clone();
        edited.patient_last = "Okafor".to_owned();
        edited.scan = Some(b"edited".to_vec());
        assert_eq!(edited.update(&reloaded, &keyring, &mut app).expect("update"), Updated::Applied { sealed: true });
        let (sealed, last, _) = raw(&mut app, "G-1");
        assert!(sealed && is_envelope(&last));
        assert_eq!(load_one(&mut app, &keyring, "G-1").expect("opens"), edited);
        let lookup = Row::patient_last_blind_index(&keyring, &owner, " OKAFOR").expect("index");
        let found = Row::load(t::table.filter(t::patient_last_bidx.eq_any(lookup)), &mut app, &keyring).expect("lookup");
        assert_eq!(found, vec![edited]);
        assert_consistent(&mut app, &keyring);
    }
}

mod decrypt_back {
    use super::*;
    guarded_schema!(phi_it_guard_decrypt);

    #[test]
    fn a_decrypt_back_between_read_and_update_is_a_conflict_and_the_retry_follows_the_rollout() {
        let db = TestDb::new();
        let mut app = setup(&db);
        let mut job = db.conn();
        let owner = common::unique_owner("guard-decrypt");
        let keyring = db.keyring();
        let rows = insert_rows(&mut app, &keyring, &owner, 4);

        // 1. The application reads sealed rows and edits them.
        let old = load_one(&mut app, &keyring, "G-1").expect("loads");
        assert!(old.phi_encrypted);
        let mut edited = old.clone();
        edited.patient_last = "Nwosu".to_owned();
        edited.scan = Some(b"edited".to_vec());
        let old2 = load_one(&mut app, &keyring, "G-2").expect("loads");
        let mut edited2 = old2.clone();
        edited2.scan = Some(b"edited".to_vec());
        let unguarded = edited2.changes(&old2, &keyring).expect("changes");
        let old3 = load_one(&mut app, &keyring, "G-3").expect("loads");

        // 2. The rollback unseals every row and commits.
        let report = migrate::decrypt_back::<Row, _>(&mut job, &keyring, &MigrateOptions::default().batch(3))
            .expect("decrypt back");
        assert_eq!((report.rows, report.remaining), (4, 0), "{report}");

        // 3. The guarded update writes nothing.
        assert_eq!(edited.update(&old, &keyring, &mut app).expect("update"), Updated::Conflict);
        let (sealed, last, scan) = raw(&mut app, "G-1");
        assert_eq!((sealed, last, scan), (false, b"Doe1".to_vec(), rows[0].scan.clone()));

        // The unguarded changeset in its place: an envelope in a flag-off
        // row, which a byte-string field reads back as garbage.
        diesel::update(t::table.find("G-2")).set(&unguarded).execute(&mut app).expect("unguarded");
        let garbage = load_one(&mut app, &keyring, "G-2").expect("loads without an error");
        let garbage_scan = garbage.scan.expect("not null");
        assert!(is_envelope(&garbage_scan) && garbage_scan != b"edited");
        diesel::delete(t::table.find("G-2")).execute(&mut app).expect("delete the broken row");

        // 4. Reload and retry: with the roll-out off (as a rollback sets it
        // everywhere), the edit lands plain ...
        keyring.set_rollout(Rollout::Nobody);
        let reloaded = load_one(&mut app, &keyring, "G-1").expect("reloads");
        let mut edited = reloaded.clone();
        edited.patient_last = "Nwosu".to_owned();
        edited.scan = Some(b"edited".to_vec());
        assert_eq!(edited.update(&reloaded, &keyring, &mut app).expect("update"), Updated::Applied { sealed: false });
        assert_eq!(raw(&mut app, "G-1"), (false, b"Nwosu".to_vec(), Some(b"edited".to_vec())));
        assert_eq!(load_one(&mut app, &keyring, "G-1").expect("opens"), edited);

        // ... and in a process still rolled out to the owner, the stale
        // read conflicts too, and the retry seals the whole row again.
        let sealing = db.keyring();
        assert_eq!(old3.clone().update(&old3, &sealing, &mut app).expect("no edit"), Updated::Unchanged);
        let mut edited3 = old3.clone();
        edited3.status = "done".to_owned();
        assert_eq!(edited3.update(&old3, &sealing, &mut app).expect("update"), Updated::Conflict);
        let reloaded3 = load_one(&mut app, &sealing, "G-3").expect("reloads");
        let mut edited3 = reloaded3.clone();
        edited3.status = "done".to_owned();
        assert_eq!(edited3.update(&reloaded3, &sealing, &mut app).expect("update"), Updated::Applied { sealed: true });
        let (sealed, last, scan) = raw(&mut app, "G-3");
        assert!(sealed && is_envelope(&last) && scan.as_deref().is_some_and(is_envelope));
        assert_eq!(load_one(&mut app, &keyring, "G-3").expect("opens"), Row { phi_encrypted: true, ..edited3 });
        assert_consistent(&mut app, &keyring);
    }
}

mod rollouts {
    use super::*;
    guarded_schema!(phi_it_guard_rollout);

    #[test]
    fn a_process_with_another_rollout_between_read_and_update_is_a_conflict() {
        let db = TestDb::new();
        let mut plain_conn = setup(&db);
        let mut sealing_conn = db.conn();
        let owner = common::unique_owner("guard-rollout");
        // Two processes: one not rolled out to the owner, one rolled out.
        let plain = db.keyring();
        plain.set_rollout(Rollout::Nobody);
        let sealing = db.keyring();
        sealing.set_rollout(Rollout::owners([owner.clone()]));
        insert_rows(&mut plain_conn, &plain, &owner, 3);

        // Both read G-1 unsealed; the rolled-out one writes first, sealing
        // the whole row.
        let seen_plain = load_one(&mut plain_conn, &plain, "G-1").expect("loads");
        let seen_sealing = load_one(&mut sealing_conn, &sealing, "G-1").expect("loads");
        let mut by_sealing = seen_sealing.clone();
        by_sealing.status = "confirmed".to_owned();
        assert_eq!(
            by_sealing.update(&seen_sealing, &sealing, &mut sealing_conn).expect("update"),
            Updated::Applied { sealed: true }
        );

        // The other's plain write would land in a sealed row: refused.
        let mut by_plain = seen_plain.clone();
        by_plain.patient_last = "Zhang".to_owned();
        assert_eq!(by_plain.update(&seen_plain, &plain, &mut plain_conn).expect("update"), Updated::Conflict);
        let (sealed, last, _) = raw(&mut plain_conn, "G-1");
        assert!(sealed && is_envelope(&last));

        // Reloaded, the edit is sealed (the row is), and both edits hold.
        let reloaded = load_one(&mut plain_conn, &plain, "G-1").expect("reloads");
        let mut by_plain = reloaded.clone();
        by_plain.patient_last = "Zhang".to_owned();
        assert_eq!(by_plain.update(&reloaded, &plain, &mut plain_conn).expect("update"), Updated::Applied { sealed: true });
        let now = load_one(&mut sealing_conn, &sealing, "G-1").expect("opens");
        assert_eq!((now.patient_last.as_str(), now.status.as_str(), now.phi_encrypted), ("Zhang", "confirmed", true));

        // The mirror: the rolled-out process read G-2 sealed, and the row
        // went back to plain and was sealed again meanwhile (decrypt-back,
        // backfill): the same state as read, so its sealed write is right.
        let mut job = db.conn();
        migrate::backfill::<Row, _>(&mut job, &plain, &MigrateOptions::default()).expect("backfill");
        let seen = load_one(&mut sealing_conn, &sealing, "G-2").expect("loads");
        assert!(seen.phi_encrypted);
        migrate::decrypt_back::<Row, _>(&mut job, &plain, &MigrateOptions::default()).expect("decrypt back");
        migrate::backfill::<Row, _>(&mut job, &plain, &MigrateOptions::default()).expect("backfill");
        let mut edited = seen.clone();
        edited.patient_last = "Haddad-Ali".to_owned();
        assert_eq!(edited.update(&seen, &sealing, &mut sealing_conn).expect("update"), Updated::Applied { sealed: true });
        assert_eq!(load_one(&mut plain_conn, &plain, "G-2").expect("opens"), edited);

        // And a process whose read is stale in the other direction: it
        // read G-3 sealed, a rollback unsealed it, and its roll-out (off
        // for the owner) would have written a sealed value into the plain
        // row's changed column: refused; the retry writes plain.
        let seen = load_one(&mut sealing_conn, &sealing, "G-3").expect("loads");
        migrate::decrypt_back::<Row, _>(&mut job, &plain, &MigrateOptions::default()).expect("decrypt back");
        let off = db.keyring();
        off.set_rollout(Rollout::Nobody);
        let mut edited = seen.clone();
        edited.scan = None;
        edited.patient_last = "Roe".to_owned();
        assert_eq!(edited.update(&seen, &off, &mut sealing_conn).expect("update"), Updated::Conflict);
        let reloaded = load_one(&mut sealing_conn, &off, "G-3").expect("reloads");
        let mut edited = reloaded.clone();
        edited.scan = None;
        edited.patient_last = "Roe".to_owned();
        assert_eq!(edited.update(&reloaded, &off, &mut sealing_conn).expect("update"), Updated::Applied { sealed: false });
        assert_eq!(raw(&mut sealing_conn, "G-3"), (false, b"Roe".to_vec(), None));
        assert_consistent(&mut plain_conn, &plain);
    }
}

mod outcomes {
    use super::*;
    guarded_schema!(phi_it_guard_outcomes);

    #[test]
    fn a_deleted_row_is_not_found_a_moved_one_conflicts_and_no_edit_sends_nothing() {
        let db = TestDb::new();
        let mut app = setup(&db);
        let mut other = db.conn();
        let owner = common::unique_owner("guard-outcomes");
        let new_owner = common::unique_owner("guard-outcomes-new");
        let keyring = db.keyring();
        insert_rows(&mut app, &keyring, &owner, 3);

        // Nothing changed: no statement, even for a row gone meanwhile.
        let g1 = load_one(&mut app, &keyring, "G-1").expect("loads");
        let g2 = load_one(&mut app, &keyring, "G-2").expect("loads");
        diesel::delete(t::table.find("G-1")).execute(&mut other).expect("delete");
        assert_eq!(g1.update(&g1, &keyring, &mut app).expect("update"), Updated::Unchanged);
        let mut edited = g1.clone();
        edited.status = "done".to_owned();
        assert_eq!(edited.update(&g1, &keyring, &mut app).expect("update"), Updated::NotFound);

        // Another writer moved G-2 to another owner (sealing it again under
        // that owner's key): a value sealed for the old owner must not land.
        let mut moved = g2.clone();
        moved.user_id.clone_from(&new_owner);
        assert_eq!(moved.update(&g2, &keyring, &mut other).expect("update"), Updated::Applied { sealed: true });
        let mut edited = g2.clone();
        edited.patient_last = "Stale".to_owned();
        assert_eq!(edited.update(&g2, &keyring, &mut app).expect("update"), Updated::Conflict);
        assert_eq!(load_one(&mut app, &keyring, "G-2").expect("opens"), moved);
        assert_consistent(&mut app, &keyring);
    }
}

mod interleaved {
    use super::*;
    guarded_schema!(phi_it_guard_interleave);

    /// The first `n` row keys in the order the jobs' batches take them.
    fn first_keys(rows: &[Row], n: usize) -> Vec<String> {
        let mut ids: Vec<String> = rows.iter().map(|r| r.case_id.clone()).collect();
        ids.sort();
        ids.truncate(n);
        ids
    }

    /// `expected` with `edits` applied, in key order, flags set to `sealed`.
    fn expect(rows: &[Row], edits: &[(String, String)], sealed: bool) -> Vec<Row> {
        let mut out: Vec<Row> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if let Some((_, last)) = edits.iter().find(|(id, _)| *id == r.case_id) {
                    r.patient_last = last.clone();
                }
                r.phi_encrypted = sealed;
                r
            })
            .collect();
        out.sort_by(|a, b| a.case_id.cmp(&b.case_id));
        out
    }

    #[test]
    fn rows_written_between_a_batchs_read_and_its_write_are_skipped_and_counted() {
        let db = TestDb::new();
        let mut conn = setup(&db);
        let owner = common::unique_owner("guard-interleave");
        let plain = db.keyring();
        plain.set_rollout(Rollout::Nobody);
        let rows = insert_rows(&mut conn, &plain, &owner, 120);
        let keyring = db.keyring();
        let load_all = |conn: &mut Conn, keyring: &Keyring| {
            Row::load(t::table.order(t::case_id), conn, keyring).expect("every row loads")
        };

        // The backfill's first batch reads and locks 50 unsealed rows;
        // then, in its transaction, the application seals three of them
        // with an edit (a guarded update); then the batch writes. Its one
        // statement must leave those three alone and say so.
        let first = first_keys(&rows, 50);
        let taken = [first[0].clone(), first[17].clone(), first[49].clone()];
        let edits: Vec<(String, String)> = taken.iter().map(|id| (id.clone(), format!("Sealed by the app {id}"))).collect();
        let mut batches = 0;
        let report = migrate::migrate_interleaved::<Row, _>(&mut conn, &keyring, &MigrateOptions::default().batch(50), true, &mut |c| {
            batches += 1;
            if batches == 1 {
                for (id, last) in &edits {
                    let old = load_one(c, &plain, id)?;
                    assert!(!old.phi_encrypted, "{id} is read unsealed");
                    let mut edited = old.clone();
                    edited.patient_last = last.clone();
                    assert_eq!(edited.update(&old, &keyring, c)?, Updated::Applied { sealed: true });
                }
            }
            Ok(())
        })
        .expect("backfill");
        assert_eq!((report.rows, report.skipped, report.remaining, report.batches), (117, 3, 0, 3), "{report}");
        assert_eq!(batches, 3);
        assert_eq!(load_all(&mut conn, &keyring), expect(&rows, &edits, true), "the application's edits kept, every other row sealed once");
        assert_consistent(&mut conn, &keyring);

        // The same in reverse: while decrypt-back's first batch holds its
        // rows, another writer (a second decrypt-back) turns two of them
        // back into their plain encoding, here with an edit; the batch's
        // statement skips both and counts them.
        let first = first_keys(&rows, 50);
        let unsealed = [first[5].clone(), first[30].clone()];
        let mut edits2 = edits.clone();
        for id in &unsealed {
            edits2.retain(|(e, _)| e != id);
            edits2.push((id.clone(), format!("Unsealed by another writer {id}")));
        }
        let mut batches = 0;
        let back = migrate::migrate_interleaved::<Row, _>(&mut conn, &keyring, &MigrateOptions::default().batch(50), false, &mut |c| {
            batches += 1;
            if batches == 1 {
                for id in &unsealed {
                    let old = load_one(c, &keyring, id)?;
                    assert!(old.phi_encrypted, "{id} is read sealed");
                    let written = diesel::update(t::table.find(id).filter(t::phi_encrypted.eq(true)))
                        .set((
                            t::patient_last.eq(format!("Unsealed by another writer {id}").into_bytes()),
                            t::patient_dob.eq(old.patient_dob.to_string().into_bytes()),
                            t::scan.eq(old.scan.clone()),
                            t::patient_last_bidx.eq(None::<Vec<u8>>),
                            t::phi_encrypted.eq(false),
                        ))
                        .execute(c)
                        .expect("the other writer's update");
                    assert_eq!(written, 1);
                }
            }
            Ok(())
        })
        .expect("decrypt back");
        assert_eq!((back.rows, back.skipped, back.remaining, back.batches), (118, 2, 0, 3), "{back}");
        assert_eq!(load_all(&mut conn, &keyring), expect(&rows, &edits2, false), "the edits kept, every row plain");
        assert_consistent(&mut conn, &keyring);
    }
}
