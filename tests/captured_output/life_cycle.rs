// The clinic's life cycle in process, on one backend, with everything
// captured. Included by `tests/captured_output.rs` once per backend, with
// `Conn`, `BLOB`, `INDEX` and `server_url()` in scope.

use std::sync::Arc;

use chrono::NaiveDate;
use diesel::prelude::*;
use phi::lifecycle::{self, ResealOptions, ResealTable};
use phi::migrate::{self, MigrateOptions, VerifyOptions};
use phi::{
    Encrypted, KeyEncryptionKey as _, KeyStore as _, Keyring, LocalKek, PhiRecord as _, Rollout,
};

diesel::table! {
    phi_co_cases (case_id) {
        case_id -> Varchar,
        user_id -> Varchar,
        patient_first -> Binary,
        patient_last -> Binary,
        patient_dob -> Binary,
        ins_provider -> Nullable<Binary>,
        patient_last_bidx -> Nullable<Binary>,
        status -> Varchar,
        phi_encrypted -> Bool,
    }
}

/// The clinic's case, on a table of this test's own.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_co_cases, crate = phi, debug)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_first: String,
    #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
    patient_last: String,
    #[phi(encrypt)]
    patient_dob: NaiveDate,
    #[phi(encrypt)]
    ins_provider: Option<String>,
    status: String,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

const TABLE: &str =
    "phi_co_cases:user_id:case_id:patient_first,patient_last,patient_dob,ins_provider";

const FIRST: [&str; 6] = [
    "Wilhelmina",
    "Bartholomew",
    "Cordelia",
    "Octavius",
    "Philippa",
    "Leopold",
];
const LAST: [&str; 6] = [
    "Quistgaard-Ølund",
    "Abernethy-Vance",
    "Szczepańska",
    "Montgomery-Oyelaran",
    "Villalobos",
    "Thistlewood",
];
const INSURERS: [&str; 3] = [
    "Zenith Mutual Health",
    "Halcyon Assurance",
    "Meridian Carefirst",
];

fn patient(i: usize, owner: &str) -> Case {
    let day = u32::try_from(i % 28).expect("small") + 1;
    Case {
        case_id: format!("{owner}-C{i}"),
        user_id: owner.to_owned(),
        patient_first: FIRST[i % FIRST.len()].to_owned(),
        patient_last: LAST[i % LAST.len()].to_owned(),
        patient_dob: NaiveDate::from_ymd_opt(1953, 4, day).expect("date"),
        ins_provider: (i % 4 != 3).then(|| INSURERS[i % INSURERS.len()].to_owned()),
        status: "scheduled".to_owned(),
        phi_encrypted: true,
    }
}

/// The patient values of `case`, as stored (their `PhiValue` encoding).
fn values_of(case: &Case) -> Vec<Secret> {
    let id = &case.case_id;
    let mut out = vec![
        Secret::new(
            format!("patient_first of {id}"),
            case.patient_first.as_bytes(),
        ),
        Secret::new(
            format!("patient_last of {id}"),
            case.patient_last.as_bytes(),
        ),
        Secret::new(
            format!("patient_dob of {id}"),
            case.patient_dob.to_string().into_bytes(),
        ),
    ];
    if let Some(ins) = &case.ins_provider {
        out.push(Secret::new(format!("ins_provider of {id}"), ins.as_bytes()));
    }
    out
}

fn insert(conn: &mut Conn, rows: &[CaseSealed]) {
    for row in rows {
        diesel::insert_into(phi_co_cases::table)
            .values(row)
            .execute(conn)
            .expect("insert");
    }
}

fn first_bytes(conn: &mut Conn, id: &str) -> Vec<u8> {
    phi_co_cases::table
        .find(id)
        .select(phi_co_cases::patient_first)
        .first(conn)
        .expect("stored value")
}

fn set_first_bytes(conn: &mut Conn, id: &str, bytes: &[u8]) {
    diesel::update(phi_co_cases::table.find(id))
        .set(phi_co_cases::patient_first.eq(bytes))
        .execute(conn)
        .expect("raw update");
}

#[test]
fn the_life_cycle_logs_and_counts_no_secret() {
    capture::install();
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = server_url().unwrap_or_else(|| dir.path().join("captured.db").display().to_string());
    let mut conn = Conn::establish(&url)
        .unwrap_or_else(|e| panic!("cannot connect to the test database {url}: {e}"));
    if server_url().is_none() {
        // The keyring writes its unwrap audit records from a thread of its
        // own: an SQLite application waits for other writers.
        diesel::sql_query("PRAGMA busy_timeout = 10000")
            .execute(&mut conn)
            .expect("busy timeout");
    }
    phi::migrations::run_pending(&mut conn).expect("phi migrations run");
    diesel::sql_query("DROP TABLE IF EXISTS phi_co_cases")
        .execute(&mut conn)
        .expect("drop");
    diesel::sql_query(format!(
        "CREATE TABLE phi_co_cases (case_id VARCHAR(255) NOT NULL PRIMARY KEY, \
         user_id VARCHAR(255) NOT NULL, patient_first {BLOB} NOT NULL, patient_last {BLOB} NOT NULL, \
         patient_dob {BLOB} NOT NULL, ins_provider {BLOB} NULL, patient_last_bidx {INDEX} NULL, \
         status VARCHAR(32) NOT NULL, phi_encrypted BOOLEAN NOT NULL)"
    ))
    .execute(&mut conn)
    .expect("create");

    let master = master_key();
    // A KEK id of this run: the key store may hold other runs' keys.
    let kek_id = common::unique_owner("captured-kek");
    let kek = Arc::new(LocalKek::new(kek_id.clone(), &master));
    let store = Arc::new(phi::DieselKeyStore::<Conn>::builder(&url).run_migrations(true).connect().expect("key store"));
    // A roll-out policy of this run: a fleet roll-out other tests set on a
    // shared database under the default policy must not decide what the
    // backfill below seals.
    let policy = common::unique_owner("captured-policy");
    let keyring = Keyring::builder(store.clone(), kek.clone())
        .actor("captured-output")
        .rollout_policy(policy.clone())
        .build()
        .expect("keyring");
    let owners = [
        common::unique_owner("co-a"),
        common::unique_owner("co-b"),
        common::unique_owner("co-legacy"),
    ];
    let mut secrets = vec![Secret::new("the master key", master.expose().to_vec())];

    // demo: sealed cases of two owners.
    let cases: Vec<Case> = (0..6).map(|i| patient(i, &owners[i % 2])).collect();
    for case in &cases {
        secrets.extend(values_of(case));
        debug(case);
    }
    let sealed = debug(Case::seal_all(&cases, &keyring).expect("seal"));
    insert(&mut conn, &sealed);

    // export: every case of an owner, decrypted.
    let mine = debug(
        Case::load(
            phi_co_cases::table
                .filter(phi_co_cases::user_id.eq(&owners[0]))
                .order(phi_co_cases::case_id),
            &mut conn,
            &keyring,
        )
        .expect("load"),
    );
    assert_eq!(mine.len(), 3);

    // update: a new last name and insurer.
    let old = mine[0].clone();
    let mut new = old.clone();
    new.patient_last = "Featherstonehaugh".into();
    new.ins_provider = Some("Castlemaine Provident".into());
    secrets.extend(values_of(&new));
    let changes = new.changes(&old, &keyring).expect("changes");
    diesel::update(phi_co_cases::table.find(&old.case_id))
        .set(&changes)
        .execute(&mut conn)
        .expect("update");

    // find: the duplicate check through the blind index.
    let index =
        Case::patient_last_blind_index(&keyring, &owners[0], " FEATHERSTONEHAUGH ")
            .expect("index");
    let found = debug(
        Case::load(
            phi_co_cases::table
                .filter(phi_co_cases::user_id.eq(&owners[0]))
                .filter(phi_co_cases::patient_last_bidx.eq_any(index)),
            &mut conn,
            &keyring,
        )
        .expect("find"),
    );
    assert_eq!(found.len(), 1);

    // Legacy rows, written before the roll-out, and one that does not decode.
    let plain = Keyring::builder(store.clone(), kek.clone())
        .rollout_policy(policy.clone())
        .rollout(Rollout::Nobody)
        .build()
        .expect("keyring");
    let legacy: Vec<Case> = (10..14).map(|i| patient(i, &owners[2])).collect();
    for case in &legacy {
        secrets.extend(values_of(case));
    }
    let mut rows = debug(Case::seal_all(&legacy, &plain).expect("plain rows"));
    let bad_dob = "27/04/1953 (day first)";
    secrets.push(Secret::new("the undecodable date of birth", bad_dob));
    rows[3].patient_dob = Encrypted::from_bytes(bad_dob.as_bytes().to_vec());
    let bad_id = legacy[3].case_id.clone();
    insert(&mut conn, &rows);

    // backfill: a dry run, a run stopped by the bad row, then the rest.
    let options = MigrateOptions::default().batch(2);
    let dry = debug(
        migrate::backfill::<Case, _>(
            &mut conn,
            &keyring,
            &options.clone().dry_run(true).progress(|p| {
                debug(p);
            }),
        )
        .expect("dry run"),
    );
    capture::push(&dry.to_string());
    assert_eq!(dry.undecodable, 1, "{dry}");
    let err = migrate::backfill::<Case, _>(
        &mut conn,
        &keyring,
        &options.clone().progress(|p| {
            debug(p);
        }),
    )
    .expect_err("the bad row stops the backfill");
    error(&err);
    diesel::delete(phi_co_cases::table.find(&bad_id))
        .execute(&mut conn)
        .expect("delete the bad row");
    let report = debug(
        migrate::backfill::<Case, _>(
            &mut conn,
            &keyring,
            &options.clone().progress(|p| {
                debug(p);
            }),
        )
        .expect("backfill"),
    );
    capture::push(&report.to_string());

    // verify: clean, then with a tampered value.
    let verified = debug(
        migrate::verify::<Case, _>(
            &mut conn,
            &keyring,
            &VerifyOptions::default().progress(|p| {
                debug(p);
            }),
        )
        .expect("verify"),
    );
    assert!(verified.is_ok(), "{verified:?}");
    let tampered_id = cases[1].case_id.clone();
    let original = first_bytes(&mut conn, &tampered_id);
    let mut bytes = original.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    set_first_bytes(&mut conn, &tampered_id, &bytes);
    let verified =
        debug(migrate::verify::<Case, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify"));
    assert_eq!(verified.failed, 1, "{verified:?}");
    for failure in &verified.failures {
        capture::push(&failure.to_string());
    }
    let err = Case::load(phi_co_cases::table.find(&tampered_id), &mut conn, &keyring)
        .expect_err("a tampered value does not open");
    error(&err);
    // Another owner's, column's or row's binding does not open it either.
    for (owner, scope, row) in [
        (
            &owners[0],
            "phi_co_cases.patient_first",
            tampered_id.as_str(),
        ),
        (
            &owners[1],
            "phi_co_cases.patient_last",
            tampered_id.as_str(),
        ),
        (&owners[1], "phi_co_cases.patient_first", "another-row"),
    ] {
        let err = keyring
            .open::<String>(
                Encrypted::from_bytes(original.clone()),
                owner,
                scope,
                row.as_bytes(),
            )
            .expect_err("bound elsewhere");
        error(&err);
    }
    set_first_bytes(&mut conn, &tampered_id, &original);
    // Another master key under the same KEK id opens nothing.
    let wrong = phi::KeyBytes::generate().expect("random source");
    secrets.push(Secret::new("the wrong master key", wrong.expose().to_vec()));
    match Keyring::builder(
        store.clone(),
        Arc::new(LocalKek::new(kek_id.clone(), &wrong)),
    )
    .build()
    {
        Ok(other) => {
            let err = Case::load(phi_co_cases::table.find(&tampered_id), &mut conn, &other)
                .expect_err("another master key opens nothing");
            error(&err);
        }
        Err(err) => error(&err),
    }

    // rotate, re-seal, retire.
    let tables = [ResealTable::parse(TABLE).expect("table description")];
    assert_eq!(lifecycle::rotate(&keyring, &owners[0]).expect("rotate"), 2);
    let resealed = debug(
        lifecycle::reseal(&mut conn, &keyring, &owners[0], &tables, &ResealOptions::default().batch_size(2).progress(|p| {
            debug(p);
        }))
        .expect("reseal"),
    );
    assert!(resealed.resealed > 0, "{resealed:?}");
    debug(lifecycle::usage(&mut conn, &owners[0], &tables).expect("usage"));
    assert!(lifecycle::retire(&mut conn, &keyring, &owners[0], 1, &tables).expect("retire"));

    // Every data key there is, before the shred destroys some.
    let owner_refs: Vec<&str> = owners.iter().map(String::as_str).collect();
    for key in store.load_keys(&owner_refs).expect("keys") {
        let dek = kek
            .unwrap(&key.owner_id, key.version, &key.wrapped_key)
            .expect("unwraps");
        secrets.push(Secret::new(
            format!("data key {} of {}", key.version, key.owner_id),
            dek.expose().to_vec(),
        ));
    }
    assert!(
        secrets
            .iter()
            .filter(|s| s.name.starts_with("data key"))
            .count()
            >= 4
    );

    // shred, and what a shredded owner gets.
    let report =
        debug(lifecycle::shred(&mut conn, &keyring, &owners[1], &tables, 10).expect("shred"));
    assert!(report.verified(), "{report:?}");
    let err = keyring
        .seal(
            &"Wilhelmina".to_owned(),
            &owners[1],
            "phi_co_cases.patient_first",
            b"new",
        )
        .expect_err("shredded");
    error(&err);
    let err = Case::load(
        phi_co_cases::table.filter(phi_co_cases::user_id.eq(&owners[1])),
        &mut conn,
        &keyring,
    )
    .expect_err("shredded values do not open");
    error(&err);
    debug(keyring.stats());
    phi::metrics::flush();

    let text = capture::text();
    for expected in [
        "phi.resolve",
        "phi.reseal",
        "generated a data key",
        "rotated a data key",
        "crypto-shredded an owner",
        "metric counter phi_seal_total",
        "metric counter phi_open_errors_total outcome=",
        "metric histogram phi_key_store_query_duration_seconds operation=",
        "metric histogram phi_open_duration_seconds",
        "metric gauge phi_cache_owners keyring=",
        "describe histogram KeyName(\"phi_seal_duration_seconds\") Some(Seconds)",
        "metric counter phi_values_resealed_total table=phi_co_cases",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} was not captured:\n{text}"
        );
    }
    assert_no_secret(
        "the captured spans, events, metrics, errors and Debug output",
        text.as_bytes(),
        &secrets,
    );
    let labels = capture::labels();
    assert!(!labels.is_empty());
    for (metric, key, value) in labels {
        assert!(!key.contains("owner"), "{metric} has an owner label");
        for owner in &owners {
            assert!(
                !value.contains(owner.as_str()),
                "{metric}'s label {key} carries owner id {owner}"
            );
        }
    }
}
