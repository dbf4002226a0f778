#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The layering in ARCHITECTURE.md, checked: every `crate::ROOM` a file
//! under `src/` names (outside its test module) must be an arrow the table
//! below allows, only `server/`, `tls/` and `cli/` may name `axum`, and
//! only `store/` names its storage engine (`heed`, LMDB).
//! Reads the source as text: no build of anything, no I/O beyond `src/`.
//!
//! `KNOWN` lists the crossings that exist today and are being removed
//! (issue 17); a crossing not in it fails, and so does an entry that no
//! longer crosses (the list only shrinks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each room and the rooms it may name. A room is a top-level module:
/// `src/ROOM.rs` or `src/ROOM/`.
const ALLOWED: &[(&str, &[&str])] = &[
    // Pure: the wire format.
    ("protocol", &[]),
    // Leaves: small helpers every layer may use.
    ("netaddr", &[]),
    ("clock", &[]),
    ("fsutil", &[]),
    ("sandbox", &[]),
    ("config", &["netaddr"]),
    // Outbound calls on a caller's word pass one policy.
    ("egress", &["netaddr"]),
    // Devices and records: neither knows the other, nor anything above.
    ("keys", &["protocol", "fsutil", "clock"]),
    ("store", &["protocol", "fsutil", "clock"]),
    // Domain: no HTTP framework, no command line.
    ("binding", &["keys", "store", "protocol", "clock"]),
    (
        "custody",
        &[
            "keys", "store", "protocol", "clock", "fsutil", "binding", "egress",
        ],
    ),
    (
        "broker",
        &[
            "keys", "store", "protocol", "clock", "netaddr", "custody", "egress",
        ],
    ),
    // The application core and certificate serving.
    (
        "app",
        &[
            "keys", "store", "protocol", "clock", "netaddr", "custody", "broker", "binding",
            "config",
        ],
    ),
    ("tls", &["keys", "fsutil", "config", "clock", "protocol"]),
    // HTTP: extracts, authenticates, calls the domain.
    (
        "server",
        &[
            "app", "custody", "broker", "binding", "keys", "store", "protocol", "tls", "netaddr",
            "clock", "config", "egress",
        ],
    ),
    // The command line: everything.
    (
        "cli",
        &[
            "app", "server", "tls", "custody", "broker", "binding", "keys", "store", "protocol",
            "config", "sandbox", "fsutil", "netaddr", "clock", "egress",
        ],
    ),
];

/// Crates only some rooms may name: the HTTP framework, and the storage
/// engine (everything else sees the store's operations, not LMDB).
const FRAMEWORKS: &[(&str, &[&str])] = &[
    ("axum", &["server", "tls", "cli"]),
    ("heed", &["store"]),
    ("tokio_postgres", &["store"]),
];

/// Crossings tolerated while they are removed, `file -> target` (none
/// left: issue 17 removed the last). The test fails on any crossing not
/// listed, and on a listed one that no longer crosses.
const KNOWN: &[&str] = &[];

/// Files compiled only for tests (their imports are the tests').
const TEST_ONLY: &[&str] = &[
    "testvectors.rs",
    "keys/conformance.rs",
    "keys/soft.rs",
    "server/tests.rs",
    "store/tests.rs",
    "custody/ticket/tests.rs",
    "custody/totp/tests.rs",
    "keys/tpm/tests.rs",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without its `#[cfg(test)] mod …` blocks (from the
/// attribute to the end of the file: test modules come last here).
fn without_tests(src: &str) -> &str {
    match src.find("#[cfg(test)]\nmod ") {
        Some(i) => &src[..i],
        None => src,
    }
}

/// The rooms a file names: `crate::ROOM` anywhere (use lines, paths), and
/// each of [`FRAMEWORKS`] as a path root.
fn named(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + 7..];
            let room: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !room.is_empty() {
                out.insert(room);
            }
            rest = tail;
        }
        for (krate, _) in FRAMEWORKS {
            if code.contains(&format!("{krate}::"))
                || code.trim_start().starts_with(&format!("use {krate}"))
            {
                out.insert(krate.to_string());
            }
        }
    }
    out
}

#[test]
fn every_import_follows_the_layering_in_architecture_md() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut all = Vec::new();
    files(&src, &mut all);
    assert!(all.len() > 40, "read {} files under src/", all.len());
    let mut found = BTreeSet::new();
    let mut unknown_rooms = BTreeSet::new();
    for f in &all {
        let rel = f
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "lib.rs" || rel == "main.rs" || TEST_ONLY.contains(&rel.as_str()) {
            continue;
        }
        let room = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(f).unwrap();
        for target in named(without_tests(&text)) {
            if target == room {
                continue;
            }
            let ok = if let Some((_, rooms)) = FRAMEWORKS.iter().find(|(k, _)| *k == target) {
                rooms.contains(&room.as_str())
            } else {
                match allowed.get(room.as_str()) {
                    Some(a) => a.contains(&target.as_str()),
                    None => {
                        unknown_rooms.insert(room.clone());
                        false
                    }
                }
            };
            if !ok {
                found.insert(format!("{rel} -> {target}"));
            }
        }
    }
    assert!(
        unknown_rooms.is_empty(),
        "rooms missing from the layering table (and ARCHITECTURE.md): {unknown_rooms:?}"
    );
    let known: BTreeSet<String> = KNOWN.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = found.difference(&known).collect();
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(
        new.is_empty(),
        "imports across a forbidden line (see ARCHITECTURE.md): {new:#?}"
    );
    assert!(
        gone.is_empty(),
        "no longer crossing: remove from KNOWN: {gone:#?}"
    );
}

/// `protocol/` is pure: no file system, network, runtime, store or HTTP
/// client in it.
#[test]
fn protocol_does_no_io() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/protocol");
    let mut all = Vec::new();
    files(&dir, &mut all);
    assert!(!all.is_empty());
    let mut found = Vec::new();
    for f in &all {
        let text = std::fs::read_to_string(f).unwrap();
        for needle in [
            "std::fs",
            "std::net",
            "tokio",
            "reqwest",
            "heed",
            "hyper",
            "std::process",
        ] {
            if without_tests(&text).contains(needle) {
                found.push(format!("{} names {needle}", f.display()));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_scanner_sees_paths_uses_and_frameworks_and_skips_comments() {
    let s = "use crate::store::Store;\nlet x = crate::keys::Backend::new();\n// crate::cli in a comment\nuse axum::Router;\n";
    let n = named(s);
    assert_eq!(n.into_iter().collect::<Vec<_>>(), ["axum", "keys", "store"]);
    let n = named("use heed::RwTxn;\nlet e: heed::Env = todo();\n");
    assert_eq!(n.into_iter().collect::<Vec<_>>(), ["heed"]);
    assert_eq!(without_tests("a\n#[cfg(test)]\nmod tests {}\n"), "a\n");
}

/// The sibling modules of one room that a file names: `super::m`,
/// `crate::ROOM::m`, or `m` inside `use super::{…}`.
fn siblings_named(src: &str, room: &str, siblings: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let word = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for prefix in ["super::".to_string(), format!("crate::{room}::")] {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(&prefix) {
            rest = &rest[i + prefix.len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                for part in list[..end].split(',') {
                    out.insert(word(part.trim()));
                }
            } else {
                out.insert(word(rest));
            }
        }
    }
    out.retain(|m| siblings.contains(m));
    out
}

/// No two files of one room import each other, directly or round a loop
/// (`mod.rs`, the room's own root, aside).
#[test]
fn no_files_of_a_room_import_each_other_in_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut cycles = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let dir = e.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let room = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut mods: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
            .filter(|m| m != "mod" && m != "tests")
            .collect();
        mods.sort();
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for m in &mods {
            let text = std::fs::read_to_string(dir.join(format!("{m}.rs"))).unwrap();
            let mut named = siblings_named(without_tests(&text), &room, &mods);
            named.remove(m);
            g.insert(m.clone(), named);
        }
        fn walk(
            g: &BTreeMap<String, BTreeSet<String>>,
            u: &str,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            out: &mut Vec<String>,
        ) {
            path.push(u.to_string());
            for v in &g[u] {
                if let Some(i) = path.iter().position(|p| p == v) {
                    out.push(format!("{} -> {v}", path[i..].join(" -> ")));
                } else if !done.contains(v) {
                    walk(g, v, path, done, out);
                }
            }
            path.pop();
            done.insert(u.to_string());
        }
        let mut done = BTreeSet::new();
        for m in &mods {
            if !done.contains(m) {
                let mut found = Vec::new();
                walk(&g, m, &mut Vec::new(), &mut done, &mut found);
                cycles.extend(found.into_iter().map(|c| format!("{room}: {c}")));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles inside a room: {cycles:#?}"
    );
}

#[test]
fn the_sibling_scanner_sees_paths_and_use_lists() {
    let mods: Vec<String> = ["fields", "totp", "gcp"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let s = "use super::{fields, totp::Params};\nlet x = crate::custody::gcp::detect(y);\n// super::nothing\n";
    assert_eq!(
        siblings_named(s, "custody", &mods)
            .into_iter()
            .collect::<Vec<_>>(),
        ["fields", "gcp", "totp"]
    );
}
