//! The layers of `phi-types`, and a check that every import points down.
//!
//! Each module of `src/` belongs to one layer ([`MODULES`]); a module may
//! use the modules of its own layer and of the layers below it, never those
//! above, and no two modules may use each other, directly or through others
//! (no circle). Only code is read: comments, doc links and string literals
//! are not imports. `lib.rs` is the crate's front door and re-exports from
//! every layer; a `crate::Name` path is placed where `lib.rs` takes `Name`
//! from.
//!
//! A new file of `src/` belongs to the module of its directory, unless the
//! table names it as a module of its own (`lifecycle::tables`); a new
//! top-level module must be added to the table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// The layers, lowest first.
const LAYERS: &[&str] = &[
    // The crate's error type and metric names, the connection trait every
    // database-facing module names, and how each backend writes a
    // set-based `UPDATE`.
    "base",
    // The stored format: the AEAD, data keys, envelope v1, value
    // encodings, nonces, `Encrypted<T>`.
    "format",
    // Keys: the key-event feed, the key store and its migrations, KEKs, the
    // keyring (and the key material derived from data keys: blind-index
    // keys, the roll-out policy the key store keeps).
    "keys",
    // Records: sealing, `PhiRecord`, blind-index normalisation.
    "records",
    // The application tables the jobs work on, and their SQL.
    "tables",
    // The jobs: key life cycle and data migration.
    "jobs",
    // What operators and services call: the admin HTTP API (the `phi` CLI,
    // another crate, sits above).
    "interfaces",
];

/// Each module and its layer. A submodule listed here is a module of its
/// own; other submodules belong to their parent.
const MODULES: &[(&str, &str)] = &[
    ("access", "base"),
    ("connection", "base"),
    ("error", "base"),
    ("metrics", "base"),
    ("set_shape", "base"),
    ("shared", "base"),
    ("sqlite", "base"),
    // The guide: documentation only, no code.
    ("guide", "base"),
    ("table_names", "base"),
    ("telemetry", "base"),
    ("cipher", "format"),
    ("dek", "format"),
    ("envelope", "format"),
    ("legacy::decoder", "format"),
    ("nonce", "format"),
    ("sql", "format"),
    ("value", "format"),
    ("feed", "keys"),
    ("kek", "keys"),
    ("keyring", "keys"),
    ("master_key", "keys"),
    ("migrations", "keys"),
    ("store", "keys"),
    ("blind", "records"),
    ("record", "records"),
    ("sealer", "records"),
    ("uuid_key", "records"),
    ("lookup_key", "records"),
    ("access_log", "records"),
    ("lifecycle::tables", "tables"),
    ("legacy", "tables"),
    ("lifecycle", "jobs"),
    ("migrate", "jobs"),
    ("lookup", "jobs"),
    ("adopt", "jobs"),
    ("admin", "interfaces"),
    ("cli", "interfaces"),
];

#[test]
fn every_import_points_down_and_no_circle_remains() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    assert!(files.len() > 20, "read only {} files of src/", files.len());
    let problems = check(&files);
    assert!(
        problems.is_empty(),
        "phi-types' layering is broken:\n{}",
        problems.join("\n")
    );
    // Every module of the table exists.
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|(path, _)| module_of(path).ok().map(|(node, _)| node))
        .collect();
    for (module, _) in MODULES {
        assert!(
            modules.contains(*module),
            "MODULES names {module}, which has no file in src/"
        );
    }
}

#[test]
fn an_import_from_a_higher_layer_is_found() {
    let problems = check(&[
        lib(),
        file("record.rs", "pub enum Rollout { All }\n"),
        file(
            "keyring/mod.rs",
            "use std::fmt;\n\nuse crate::record::Rollout;\n",
        ),
    ]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("src/keyring/mod.rs:3: `crate::record::Rollout`"),
        "{problems:?}"
    );
    assert!(problems[0].contains("layer keys"), "{problems:?}");
    assert!(problems[0].contains("layer records"), "{problems:?}");
}

#[test]
fn a_circle_within_a_layer_is_found() {
    let problems = check(&[
        lib(),
        file("kek/check.rs", "fn f(s: &dyn crate::store::KeyStore) {}\n"),
        file("kek/mod.rs", "mod check;\n"),
        file("store/mod.rs", "use crate::kek::KekCheck;\n"),
    ]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("circle"), "{problems:?}");
    assert!(
        problems[0].contains("src/kek/check.rs:1: `crate::store::KeyStore`"),
        "{problems:?}"
    );
    assert!(
        problems[0].contains("src/store/mod.rs:1: `crate::kek::KekCheck`"),
        "{problems:?}"
    );
}

#[test]
fn super_self_root_and_grouped_paths_are_followed() {
    let problems = check(&[
        lib(),
        // `super` of a submodule file is its parent: tables → lifecycle.
        file("lifecycle/tables.rs", "use super::reseal;\n"),
        // `super` inside an inline module is the file's own module.
        file(
            "migrate.rs",
            "#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        ),
        // A name `lib.rs` re-exports is placed where it comes from.
        file("store/mod.rs", "fn f() -> crate::Rollout { todo!() }\n"),
        // Grouped imports, and a child module of its own named relatively.
        file(
            "lifecycle/mod.rs",
            "pub use tables::ResealTable;\nuse crate::{keyring::Keyring, admin::router};\n",
        ),
    ]);
    let expected = [
        "src/lifecycle/tables.rs:1: `super::reseal`",
        "src/store/mod.rs:1: `crate::Rollout`",
        "src/lifecycle/mod.rs:2: `crate::admin::router`",
        "circle among lifecycle, lifecycle::tables:\n  \
         src/lifecycle/tables.rs:1: `super::reseal`\n  \
         src/lifecycle/mod.rs:1: `tables::ResealTable`",
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:?}");
    for (problem, start) in problems.iter().zip(expected) {
        assert!(problem.starts_with(start), "{problems:?}");
    }
}

#[test]
fn comments_strings_and_doc_links_are_not_imports() {
    let problems = check(&[
        lib(),
        file(
            "keyring/mod.rs",
            "//! See [`Rollout`](crate::record::Rollout).\n\
             /* use crate::record::Rollout; /* nested */ */\n\
             const A: &str = \"crate::record::Rollout\";\n\
             const B: &str = r#\"crate::migrate::x\"#;\n\
             const C: char = '\"'; // crate::admin\n\
             fn f<'a>(x: &'a str) -> &'a str { x }\n\
             pub(crate) fn g() {}\n",
        ),
    ]);
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn a_file_outside_the_table_is_reported() {
    let problems = check(&[lib(), file("shiny.rs", "use crate::error::Error;\n")]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("src/shiny.rs"), "{problems:?}");
}

fn lib() -> (String, String) {
    file("lib.rs", "pub use record::{Rollout, Updated};\n")
}

fn file(path: &str, text: &str) -> (String, String) {
    (path.to_owned(), text.to_owned())
}

/// Every `.rs` file under `dir`, as its path relative to `src` (with `/`)
/// and its text.
fn read_tree(src: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(src, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(src)
                .expect("under src")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.push((relative, text));
        }
    }
}

/// One use of another module: where, and the path as written.
struct Use {
    from: String,
    to: String,
    file: String,
    line: usize,
    path: String,
}

/// The problems of a set of source files (paths relative to `src/`).
fn check(files: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let roots = files
        .iter()
        .find(|(path, _)| path == "lib.rs")
        .map(|(_, text)| root_exports(text))
        .unwrap_or_default();
    let mut uses = Vec::new();
    for (path, text) in files {
        if path == "lib.rs" {
            continue;
        }
        let (node, module_path) = match module_of(path) {
            Ok(found) => found,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        for (line, written, target) in paths_in(&tokens(text), &module_path) {
            let to = match place(&target, &roots) {
                Some(to) => to,
                None => {
                    problems.push(format!(
                        "src/{path}:{line}: `{written}` names no module of the layer table"
                    ));
                    continue;
                }
            };
            if to != node {
                uses.push(Use {
                    from: node.clone(),
                    to,
                    file: path.clone(),
                    line,
                    path: written,
                });
            }
        }
    }
    for u in &uses {
        let (from, to) = (layer(&u.from), layer(&u.to));
        if to > from {
            problems.push(format!(
                "src/{}:{}: `{}` points up, from {} (layer {}) to {} (layer {})",
                u.file, u.line, u.path, u.from, LAYERS[from], u.to, LAYERS[to]
            ));
        }
    }
    problems.extend(circles(&uses));
    problems
}

/// The layer index of a module of the table.
fn layer(module: &str) -> usize {
    let (_, name) = MODULES
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap_or_else(|| panic!("{module} is not in MODULES"));
    LAYERS
        .iter()
        .position(|l| l == name)
        .unwrap_or_else(|| panic!("{module}'s layer {name} is not in LAYERS"))
}

/// The table's module of a file, and the file's own module path
/// (`keyring/cache.rs` is `keyring::cache`, in module `keyring`).
fn module_of(path: &str) -> Result<(String, Vec<String>), String> {
    let mut parts: Vec<String> = path
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match node_of(&parts) {
        Some(node) => Ok((node, parts)),
        None => Err(format!(
            "src/{path} belongs to no module of the layer table (MODULES in tests/layering.rs)"
        )),
    }
}

/// The longest prefix of a module path that the table names.
fn node_of(parts: &[String]) -> Option<String> {
    (1..=parts.len()).rev().find_map(|n| {
        let name = parts[..n].join("::");
        MODULES.iter().any(|(m, _)| *m == name).then_some(name)
    })
}

/// Where a path from the crate root lands: a module of the table, directly
/// or through one of `lib.rs`'s re-exports.
fn place(target: &[String], roots: &BTreeMap<String, Vec<String>>) -> Option<String> {
    if let Some(node) = node_of(target) {
        return Some(node);
    }
    let first = target.first()?;
    node_of(roots.get(first)?)
}

/// The names `lib.rs` re-exports from the crate's modules, and where from.
fn root_exports(text: &str) -> BTreeMap<String, Vec<String>> {
    let tokens = tokens(text);
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i].text == "use" {
            let mut paths = Vec::new();
            let end = use_tree(&tokens, i + 1, Vec::new(), &mut paths);
            for path in paths {
                if let Some(name) = path.last() {
                    out.entry(name.clone()).or_insert(path);
                }
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Reads a use tree starting at `i` below `prefix`: the full paths it
/// names. Returns the index after it.
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    loop {
        match tokens.get(i).map(|t| t.text.as_str()) {
            Some("{") => {
                i += 1;
                loop {
                    match tokens.get(i).map(|t| t.text.as_str()) {
                        Some("}") => return i + 1,
                        Some(",") => i += 1,
                        None => return i,
                        Some(_) => i = use_tree(tokens, i, path.clone(), out),
                    }
                }
            }
            Some("::") => i += 1,
            Some("self") if !path.is_empty() => {
                out.push(path);
                return i + 1;
            }
            Some(t) if is_ident(t) => {
                path.push(t.to_owned());
                i += 1;
                if tokens.get(i).is_none_or(|t| t.text != "::") {
                    if tokens.get(i).is_some_and(|t| t.text == "as") {
                        i += 2;
                    }
                    out.push(path);
                    return i;
                }
            }
            _ => {
                if !path.is_empty() {
                    out.push(path);
                }
                return i;
            }
        }
    }
}

/// The paths in a file's code that name other modules: `crate::…`,
/// `super::…`, and a child module of its own named relatively. Each with
/// its line, the path as written, and the path from the crate root.
fn paths_in(tokens: &[Token], module_path: &[String]) -> Vec<(usize, String, Vec<String>)> {
    let mut out = Vec::new();
    // Inline modules open at each depth of braces (`mod tests { … }`).
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        let starts_path = i == 0 || tokens[i - 1].text != "::";
        let followed = tokens.get(i + 1).is_some_and(|n| n.text == "::");
        match t.text.as_str() {
            "{" => {
                if i >= 2 && tokens[i - 2].text == "mod" {
                    inline.push(depth);
                }
                depth += 1;
            }
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            "crate" | "super" if starts_path && followed => {
                let mut base: Vec<String> = Vec::new();
                let mut j = i;
                if t.text == "super" {
                    base = module_path.to_vec();
                    let mut inner = inline.len();
                    while tokens.get(j).is_some_and(|t| t.text == "super")
                        && tokens.get(j + 1).is_some_and(|t| t.text == "::")
                    {
                        if inner > 0 {
                            inner -= 1;
                        } else {
                            base.pop();
                        }
                        j += 2;
                    }
                    if inner > 0 {
                        // Still inside the file's own module.
                        i = j;
                        continue;
                    }
                } else {
                    j += 2;
                }
                let prefix: String = tokens[i..j].iter().map(|t| t.text.as_str()).collect();
                let skip = base.len();
                let mut paths = Vec::new();
                let end = use_tree(tokens, j, base, &mut paths);
                for path in paths {
                    let shown = format!("{prefix}{}", path[skip..].join("::"));
                    out.push((t.line, shown, path));
                }
                i = end;
                continue;
            }
            name if starts_path
                && followed
                && is_ident(name)
                && (i == 0 || tokens[i - 1].text != "mod") =>
            {
                let mut child = module_path.to_vec();
                child.push(name.to_owned());
                let own = node_of(module_path);
                if node_of(&child).is_some_and(|n| Some(&n) != own.as_ref())
                    && MODULES.iter().any(|(m, _)| *m == child.join("::"))
                {
                    let skip = module_path.len();
                    let mut paths = Vec::new();
                    let end = use_tree(tokens, i + 2, child, &mut paths);
                    for path in paths {
                        out.push((t.line, path[skip..].join("::"), path));
                    }
                    i = end;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Modules that use each other, directly or through others: each circle
/// with the uses that close it.
fn circles(uses: &[Use]) -> Vec<String> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for u in uses {
        graph.entry(&u.from).or_default().insert(&u.to);
    }
    let nodes: Vec<&str> = graph.keys().copied().collect();
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            if n == to {
                return true;
            }
            if seen.insert(n) {
                stack.extend(graph.get(n).into_iter().flatten().copied());
            }
        }
        false
    };
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    for &n in &nodes {
        if done.contains(n) {
            continue;
        }
        let members: BTreeSet<&str> = nodes
            .iter()
            .copied()
            .filter(|&m| reaches(n, m) && reaches(m, n))
            .collect();
        done.extend(members.iter().copied());
        if members.len() < 2 {
            continue;
        }
        let mut text = format!(
            "circle among {}:",
            members.iter().copied().collect::<Vec<_>>().join(", ")
        );
        let mut shown = BTreeSet::new();
        for u in uses {
            if members.contains(u.from.as_str())
                && members.contains(u.to.as_str())
                && shown.insert((u.from.as_str(), u.to.as_str()))
            {
                let _ = write!(text, "\n  src/{}:{}: `{}`", u.file, u.line, u.path);
            }
        }
        out.push(text);
    }
    out
}

/// A token of code: an identifier, `::`, or one punctuation character.
struct Token {
    text: String,
    line: usize,
}

fn is_ident(text: &str) -> bool {
    text.starts_with(|c: char| c.is_alphabetic() || c == '_')
        && text.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// The code of `text` as tokens, without comments, string and character
/// literals.
fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize, s: &str| {
        s.chars()
            .enumerate()
            .all(|(k, c)| chars.get(i + k) == Some(&c))
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if at(i, "//") {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if at(i, "/*") {
            let mut nested = 0;
            while i < chars.len() {
                if at(i, "/*") {
                    nested += 1;
                    i += 2;
                } else if at(i, "*/") {
                    nested -= 1;
                    i += 2;
                    if nested == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == '"' || ((c == 'b' || c == 'c') && chars.get(i + 1) == Some(&'"')) {
            i += if c == '"' { 1 } else { 2 };
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if chars.get(i) == Some(&'\n') {
                    line += 1;
                }
                i += 1;
            }
            i += 1;
        } else if (c == 'r' || ((c == 'b' || c == 'c') && chars.get(i + 1) == Some(&'r')))
            && {
                let mut k = i + if c == 'r' { 1 } else { 2 };
                while chars.get(k) == Some(&'#') {
                    k += 1;
                }
                chars.get(k) == Some(&'"')
            }
            && (i == 0 || !is_ident(&chars[i - 1].to_string()))
        {
            i += if c == 'r' { 1 } else { 2 };
            let mut hashes = 0;
            while chars[i] == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            let close: String = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while i < chars.len() && !at(i, &close) {
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += close.len();
        } else if c == '\'' {
            // A character literal, or a lifetime / label.
            if chars.get(i + 1) == Some(&'\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let word = if word == "$crate" {
                "crate".to_owned()
            } else {
                word
            };
            out.push(Token { text: word, line });
        } else if at(i, "::") {
            out.push(Token {
                text: "::".to_owned(),
                line,
            });
            i += 2;
        } else if c.is_whitespace() {
            i += 1;
        } else {
            out.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    out
}
