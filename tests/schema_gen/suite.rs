// The schema-migration tests of one backend, included by
// `tests/schema_gen.rs` with `Conn` and `url()` in scope.

/// A connection, and the SQLite file's directory kept alive.
struct Db {
    conn: Conn,
    _dir: Option<tempfile::TempDir>,
}

fn db() -> Db {
    match url() {
        Some(url) => Db {
            conn: Conn::establish(&url)
                .unwrap_or_else(|e| panic!("the test database {url} is needed: {e}")),
            _dir: None,
        },
        None => {
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("schema.db").display().to_string();
            Db {
                conn: Conn::establish(&path).expect("SQLite file"),
                _dir: Some(dir),
            }
        }
    }
}

const D: Dialect = <Conn as SchemaConnection>::DIALECT;

/// The legacy table with its two rows, a plain and a UNIQUE index on
/// encrypted columns, a DATE column, nullable columns and a default.
fn legacy(conn: &mut Conn, table: &str) {
    conn.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (id VARCHAR(64) NOT NULL PRIMARY KEY, owner_id VARCHAR(64) NOT NULL, \
         last_name VARCHAR(100) NOT NULL DEFAULT 'unknown', email VARCHAR(200) NULL, dob DATE NULL, \
         note TEXT NULL, visits INTEGER NOT NULL DEFAULT 0); \
         CREATE INDEX {table}_last ON {table} (owner_id, last_name); \
         CREATE UNIQUE INDEX {table}_email ON {table} (email); \
         CREATE INDEX {table}_visits ON {table} (visits)"
    ))
    .expect("legacy table");
    for r in legacy_rows() {
        let quote = |v: &Option<String>| v.as_ref().map_or("NULL".into(), |v| format!("'{v}'"));
        conn.batch_execute(&format!(
            "INSERT INTO {table} (id, owner_id, last_name, email, dob, note) VALUES \
             ('{}', 'dr-a', '{}', {}, {}, {})",
            r.id,
            r.last_name,
            quote(&r.email),
            quote(&r.dob.map(|d| d.to_string())),
            quote(&r.note),
        ))
        .expect("legacy row");
    }
}

fn plain(conn: &mut Conn, table: &str) -> Vec<Plain> {
    diesel::sql_query(format!(
        "SELECT id, last_name, email, dob, note FROM {table} ORDER BY id"
    ))
    .load(conn)
    .expect("plain rows")
}

fn bytes(conn: &mut Conn, table: &str) -> Vec<Bytes> {
    diesel::sql_query(format!(
        "SELECT id, last_name, email, dob, note FROM {table} ORDER BY id"
    ))
    .load(conn)
    .expect("rows as bytes")
}

fn introspect(conn: &mut Conn, table: &'static str) -> TableSchema {
    conn.introspect(table).expect("introspection")
}

fn is_binary(schema: &TableSchema, column: &str) -> bool {
    let ty = schema.column(column).expect(column).sql_type.to_ascii_lowercase();
    match D {
        Dialect::Postgres => ty == "bytea",
        Dialect::Mysql => ty.contains("binary") || ty.contains("blob"),
        _ => true,
    }
}

fn index_names(schema: &TableSchema) -> Vec<&str> {
    schema.indexes.iter().map(|i| i.name.as_str()).collect()
}

#[test]
fn in_place_up_converts_keeping_the_bytes_and_down_restores_the_table() {
    let Db { mut conn, _dir } = db();
    let table = unique_table("ip");
    legacy(&mut conn, table);
    let before = introspect(&mut conn, table);
    assert_eq!(before.indexes_on(&["last_name", "email"]).len(), 2, "{before:#?}");

    let m = adopt::migration_for(&model(table, false), &mut conn, Strategy::InPlace, &Options::default())
        .expect("in-place migration");
    assert!(m.up.lines().filter(|l| !l.starts_with("--") && !l.is_empty()).count() > 0);
    conn.batch_execute(&m.up).unwrap_or_else(|e| panic!("up.sql fails: {e}\n{}", m.up));

    let after = introspect(&mut conn, table);
    if D == Dialect::Mysql {
        // The owner column compares bytes, with no padding.
        let (_, collation) = after.column("owner_id").expect("owner").collation.clone().expect("text");
        assert!(collation.ends_with("_nopad_bin") || collation.ends_with("_0900_bin"), "{collation}");
    }
    for c in ["last_name", "email", "dob", "note"] {
        assert!(is_binary(&after, c), "{c}: {after:#?}");
    }
    assert!(!is_binary(&after, "visits") || D == Dialect::Sqlite, "other columns untouched");
    let flag = after.column("phi_encrypted").expect("flag added");
    assert!(!flag.nullable);
    assert!(after.column("last_name_bidx").expect("blind index column").nullable);
    let names = index_names(&after);
    let bidx = format!("phi_{table}_last_name_bidx");
    assert!(names.contains(&bidx.as_str()), "{names:?}");
    let index = after.indexes.iter().find(|i| i.name == bidx).expect("index");
    assert_eq!(index.columns, ["owner_id", "last_name_bidx"]);
    for gone in [format!("{table}_last"), format!("{table}_email")] {
        assert!(!names.contains(&gone.as_str()), "{gone} dropped: {names:?}");
    }
    assert!(names.contains(&format!("{table}_visits").as_str()), "{names:?}");
    assert_eq!(bytes(&mut conn, table), legacy_bytes(), "the stored bytes are the text's");

    // A sealed row: down refuses, changing nothing.
    conn.batch_execute(&format!("UPDATE {table} SET phi_encrypted = TRUE WHERE id = 'r1'"))
        .expect("flag on");
    let refused = conn.batch_execute(&m.down).expect_err("down refuses while a row is sealed");
    assert!(
        refused.to_string().contains("decrypt") || refused.to_string().contains("phi_rows_are_sealed"),
        "{refused}"
    );
    assert_eq!(introspect(&mut conn, table), after, "nothing changed");
    conn.batch_execute(&format!("UPDATE {table} SET phi_encrypted = FALSE"))
        .expect("flag off");

    conn.batch_execute(&m.down).unwrap_or_else(|e| panic!("down.sql fails: {e}\n{}", m.down));
    assert_eq!(introspect(&mut conn, table), before, "down.sql restores the table exactly");
    assert_eq!(plain(&mut conn, table), legacy_rows(), "and its data");
}

#[test]
fn shadow_up_adds_nullable_binary_shadows_and_down_drops_them() {
    let Db { mut conn, _dir } = db();
    let table = unique_table("sh");
    legacy(&mut conn, table);
    let before = introspect(&mut conn, table);
    let m = adopt::migration_for(&model(table, false), &mut conn, Strategy::Shadow, &Options::default())
        .expect("shadow migration");
    conn.batch_execute(&m.up).unwrap_or_else(|e| panic!("up.sql fails: {e}\n{}", m.up));
    let after = introspect(&mut conn, table);
    for c in ["last_name", "email", "dob", "note"] {
        let shadow = format!("{c}_encrypted");
        let info = after.column(&shadow).unwrap_or_else(|| panic!("{shadow}: {after:#?}"));
        assert!(info.nullable, "{shadow}");
        assert!(is_binary(&after, &shadow), "{shadow}");
        assert_eq!(after.column(c), before.column(c), "{c} untouched");
    }
    for i in &before.indexes {
        assert!(after.indexes.contains(i), "{} kept", i.name);
    }
    assert!(index_names(&after).contains(&format!("phi_{table}_last_name_bidx").as_str()));
    assert_eq!(plain(&mut conn, table), legacy_rows());

    let again = adopt::migration_for(&model(table, false), &mut conn, Strategy::Shadow, &Options::default())
        .expect_err("a shadow column already present");
    let message = again.to_string();
    assert!(message.contains(table) && message.contains("last_name_encrypted"), "{message}");

    conn.batch_execute(&m.down).unwrap_or_else(|e| panic!("down.sql fails: {e}\n{}", m.down));
    assert_eq!(introspect(&mut conn, table), before);
    assert_eq!(plain(&mut conn, table), legacy_rows());
}

#[test]
fn finalize_refuses_an_unsealed_row_then_replaces_the_plain_columns_and_down_restores_them() {
    let Db { mut conn, _dir } = db();
    let table = unique_table("fin");
    legacy(&mut conn, table);
    let before = introspect(&mut conn, table);
    let shadow = adopt::migration_for(&model(table, true), &mut conn, Strategy::Shadow, &Options::default())
        .expect("shadow migration");
    conn.batch_execute(&shadow.up).expect("shadow up");
    // Row r1 sealed into the shadows (envelope-looking bytes); r2 not yet.
    conn.batch_execute(&format!(
        "UPDATE {table} SET last_name_encrypted = {}, email_encrypted = {}, dob_encrypted = {}, \
         note_encrypted = {}, phi_encrypted = TRUE WHERE id = 'r1'",
        hex_literal(D, &envelope(1)),
        hex_literal(D, &envelope(2)),
        hex_literal(D, &envelope(3)),
        hex_literal(D, &envelope(4)),
    ))
    .expect("seal r1");
    let shadowed = introspect(&mut conn, table);

    let no_shadow = adopt::migration_for(&model(table, false), &mut conn, Strategy::Finalize, &Options::default())
        .expect_err("a model without shadow columns");
    assert!(no_shadow.to_string().contains("shadow"), "{no_shadow}");

    let m = adopt::migration_for(&model(table, true), &mut conn, Strategy::Finalize, &Options::default())
        .expect("finalize migration");
    let refused = conn.batch_execute(&m.up).expect_err("up refuses while a row is unsealed");
    assert!(refused.to_string().contains("not_sealed") || refused.to_string().contains("not sealed"), "{refused}");
    assert_eq!(introspect(&mut conn, table), shadowed, "nothing changed");

    conn.batch_execute(&format!(
        "UPDATE {table} SET last_name_encrypted = {}, phi_encrypted = TRUE WHERE id = 'r2'",
        hex_literal(D, &envelope(5)),
    ))
    .expect("seal r2");
    conn.batch_execute(&m.up).unwrap_or_else(|e| panic!("up.sql fails: {e}\n{}", m.up));
    let done = introspect(&mut conn, table);
    let columns: Vec<&str> = done.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        columns.iter().filter(|c| c.ends_with("_encrypted") && **c != "phi_encrypted").count(),
        0,
        "{columns:?}"
    );
    for c in ["last_name", "email", "dob", "note"] {
        assert!(is_binary(&done, c), "{c} is the sealed column now");
    }
    if D != Dialect::Sqlite {
        assert!(!done.column("last_name").expect("last_name").nullable, "NOT NULL restored");
    }
    assert!(!index_names(&done).contains(&format!("{table}_last").as_str()));
    let sealed = bytes(&mut conn, table);
    assert_eq!(sealed[0].last_name, envelope(1));
    assert_eq!(sealed[0].note, Some(envelope(4)));
    assert_eq!(sealed[1].last_name, envelope(5));
    assert_eq!(sealed[1].email, None);
    // The sealed check refuses plain bytes in a sealed row.
    conn.batch_execute(&format!("UPDATE {table} SET email = {} WHERE id = 'r1'", hex_literal(D, b"plain")))
        .expect_err("the sealed check refuses");
    if D == Dialect::Sqlite {
        conn.batch_execute(&format!("UPDATE {table} SET last_name = NULL WHERE id = 'r1'"))
            .expect_err("NOT NULL kept by triggers");
    }

    conn.batch_execute(&m.down).unwrap_or_else(|e| panic!("down.sql fails: {e}\n{}", m.down));
    let restored = introspect(&mut conn, table);
    for c in ["last_name", "email", "dob", "note"] {
        let info = restored.column(c).expect(c);
        assert_eq!(info.sql_type, before.column(c).expect(c).sql_type, "{c}'s type");
        assert!(info.nullable, "{c} comes back nullable");
        assert!(is_binary(&restored, &format!("{c}_encrypted")));
    }
    for i in &before.indexes {
        assert!(
            restored.indexes.iter().any(|r| r.name == i.name && r.columns == i.columns && r.unique == i.unique),
            "{} recreated: {restored:#?}",
            i.name
        );
    }
    let values = bytes_of(&mut conn, table);
    assert_eq!(values, vec![envelope(1), envelope(5)], "the sealed values kept");
}

fn bytes_of(conn: &mut Conn, table: &str) -> Vec<Vec<u8>> {
    #[derive(QueryableByName)]
    struct V {
        #[diesel(sql_type = Binary)]
        v: Vec<u8>,
    }
    diesel::sql_query(format!("SELECT last_name_encrypted AS v FROM {table} ORDER BY id"))
        .load::<V>(conn)
        .expect("shadow values")
        .into_iter()
        .map(|r| r.v)
        .collect()
}

#[test]
fn check_alone_and_errors_name_table_and_column() {
    let Db { mut conn, _dir } = db();
    let table = unique_table("chk");
    legacy(&mut conn, table);
    let unknown = adopt::migration_for(&model("sg_no_such_table", false), &mut conn, Strategy::InPlace, &Options::default())
        .expect_err("unknown table");
    assert!(unknown.to_string().contains("sg_no_such_table"), "{unknown}");
    let check = adopt::migration_for(&model(table, false), &mut conn, Strategy::Check, &Options::default())
        .expect_err("no flag column yet");
    assert!(check.to_string().contains("phi_encrypted"), "{check}");
    let mut missing = model(table, false);
    missing.columns[1].column = "e_mail";
    let e = adopt::migration_for(&missing, &mut conn, Strategy::InPlace, &Options::default())
        .expect_err("a missing column");
    assert!(e.to_string().contains(table) && e.to_string().contains("e_mail"), "{e}");

    let ip = adopt::migration_for(&model(table, false), &mut conn, Strategy::InPlace, &Options::default())
        .expect("in place");
    conn.batch_execute(&ip.up).expect("in place up");
    let m = adopt::migration_for(&model(table, false), &mut conn, Strategy::Check, &Options::default())
        .expect("check");
    conn.batch_execute(&m.up).unwrap_or_else(|e| panic!("{e}\n{}", m.up));
    conn.batch_execute(&format!(
        "UPDATE {table} SET last_name = {}, email = NULL, dob = NULL, note = NULL, phi_encrypted = TRUE WHERE id = 'r2'",
        hex_literal(D, &envelope(9))
    ))
    .expect("an envelope passes");
    conn.batch_execute(&format!("UPDATE {table} SET phi_encrypted = TRUE WHERE id = 'r1'"))
        .expect_err("plain text in a sealed row is refused");
    conn.batch_execute(&m.down).expect("check down");
    conn.batch_execute(&format!("UPDATE {table} SET phi_encrypted = TRUE WHERE id = 'r1'"))
        .expect("no check any more");

    let dir = tempfile::tempdir().expect("directory");
    let path = m.write(dir.path()).expect("written");
    let name = path.file_name().expect("name").to_string_lossy().into_owned();
    assert!(name.ends_with(&format!("_phi_check_{table}")), "{name}");
    assert_eq!(std::fs::read_to_string(path.join("up.sql")).expect("up"), m.up);
    assert_eq!(std::fs::read_to_string(path.join("down.sql")).expect("down"), m.down);
    // A second migration written in the same second gets a later version,
    // so Diesel runs (and records) both, in order.
    let second = m.write(dir.path()).expect("written again");
    let version = |p: &std::path::Path| p.file_name().expect("name").to_string_lossy()[..17].to_owned();
    assert!(version(&second) > version(&path), "{second:?} after {path:?}");
}
