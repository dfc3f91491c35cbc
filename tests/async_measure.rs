//! Measurements behind the async API's documented thresholds (not
//! assertions): `cargo test --features async --test async_measure -- --ignored --nocapture`.
#![cfg(all(feature = "async", feature = "sqlite"))]
#![allow(clippy::print_stdout, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use phi::{Keyring, MemoryKeyStore, PhiRecord};

diesel::table! {
    measure_cases (case_id) {
        case_id -> Text,
        user_id -> Text,
        patient_last -> Binary,
        patient_first -> Binary,
        patient_dob -> Binary,
    }
}

#[derive(PhiRecord, Clone, PartialEq)]
#[phi(table = measure_cases, crate = phi)]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
    #[phi(encrypt)]
    patient_first: String,
    #[phi(encrypt)]
    patient_dob: chrono::NaiveDate,
}

#[test]
#[ignore = "a measurement, run by hand"]
fn hand_off_and_open_costs() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // A hand-off to the blocking pool and back.
        for _ in 0..1_000 {
            tokio::task::spawn_blocking(|| ()).await.expect("warm-up");
        }
        let n = 20_000;
        let started = Instant::now();
        for _ in 0..n {
            tokio::task::spawn_blocking(|| ()).await.expect("hand-off");
        }
        println!("spawn_blocking round trip: {:?}", started.elapsed() / n);

        // Opening rows of three encrypted fields, keys cached.
        let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), common::local_kek())
            .build()
            .expect("keyring");
        let rows: Vec<Case> = (0..100)
            .map(|i| Case {
                case_id: format!("C-{i}"),
                user_id: "prov-1".into(),
                patient_last: "Doe-Smith".into(),
                patient_first: "Jane".into(),
                patient_dob: chrono::NaiveDate::from_ymd_opt(1980, 1, 15).expect("date"),
            })
            .collect();
        let sealed = Case::seal_all(&rows, &keyring).expect("seal");
        let rounds = 2_000u32;
        let started = Instant::now();
        for _ in 0..rounds {
            let opened =
                Case::open_all(sealed.iter().map(clone_sealed).collect(), &keyring).expect("open");
            assert_eq!(opened.len(), 100);
        }
        println!(
            "open_all, 3 fields: {:?} per row",
            started.elapsed() / (rounds * 100)
        );
    });
}

fn clone_sealed(s: &CaseSealed) -> CaseSealed {
    CaseSealed {
        case_id: s.case_id.clone(),
        user_id: s.user_id.clone(),
        patient_last: s.patient_last.clone(),
        patient_first: s.patient_first.clone(),
        patient_dob: s.patient_dob.clone(),
    }
}
