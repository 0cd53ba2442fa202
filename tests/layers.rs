//! The layers of docs/architecture.md, kept true: every `crate::` path (and
//! `super::` path) in `src/` points to a module in the same layer or one
//! below, and no module reaches itself again through others (no circles).
//! Comments and `#[cfg(test)]` modules are not read: a doc link names a
//! type, and a test may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// From the bottom up; a module may use its own layer and those below.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "core: pure, no I/O beyond the environment",
        &[
            "aggregation",
            "charts",
            "config",
            "failpoint",
            "migrations",
            "pace",
            "periods",
            "progress",
            "quota",
            "schedule",
            "signing",
            "stdio",
            "text_table",
        ],
    ),
    (
        "transport: the PostgREST client, the alerts webhook's client",
        &["postgrest", "webhook"],
    ),
    (
        "database: one module per family of database calls and answers",
        &[
            "adjustments",
            "alerts",
            "dashboard",
            "ledger",
            "booking",
            "preflight",
            "state",
            "tables",
        ],
    ),
    (
        "store: the Store trait, over REST and in memory",
        &["store"],
    ),
    ("engines", &["engine"]),
    (
        "application: a run, its verdict's status, its output",
        &[
            "cli",
            "exit",
            "html_report",
            "job",
            "metrics",
            "output",
            "ping",
            "printer",
        ],
    ),
    ("commands", &["commands"]),
    ("entry", &["main", "lib"]),
];

/// Macros exported at the crate root, and the module that defines them.
const MACROS: &[(&str, &str)] = &[("out", "stdio"), ("outln", "stdio"), ("errln", "stdio")];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module of the crate, by path (`engine::rebuild`), with its file.
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}::{name}")
            };
            if p.is_dir() {
                walk(&p, &path, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let module = if name == "mod" {
                    prefix.to_string()
                } else {
                    path
                };
                out.insert(module, p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), "", &mut out);
    out
}

/// The top-level module a module belongs to, which names its layer.
fn top(module: &str) -> &str {
    module.split("::").next().unwrap()
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|(_, ms)| ms.contains(&top(module)))
        .unwrap_or_else(|| {
            panic!(
                "src/ module {module} is in no layer: add it to LAYERS and to docs/architecture.md"
            )
        })
}

/// The code of a file without comments and without its test module.
fn code(path: &Path) -> String {
    let mut text = std::fs::read_to_string(path).unwrap();
    // Every `#[cfg(test)] mod ... { ... }`, to its matching brace (a test
    // module in the middle of a file hides nothing after it).
    while let Some(i) = text.find("#[cfg(test)]\nmod ") {
        let open = i + text[i..].find('{').unwrap();
        let mut depth = 0;
        let mut end = text.len();
        for (k, c) in text[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        text.replace_range(i..end, "");
    }
    text.lines()
        .map(|l| match l.find("//") {
            // A "//" inside a string (a URL) is rare here; cut at the
            // first one outside quotes.
            Some(i) if l[..i].matches('"').count() % 2 == 0 => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after `crate::` or `super::` in `text`, as segments; a
/// `use` group (`crate::{a, b::c}`) gives one path per member.
fn paths(text: &str, anchor: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(anchor) {
        let before = rest[..i].chars().last();
        rest = &rest[i + anchor.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        out.extend(expand(rest));
    }
    out
}

/// `a::b::{c, d::e}` at the start of `s` (after its anchor) as paths.
fn expand(s: &str) -> Vec<Vec<String>> {
    let mut segs: Vec<String> = Vec::new();
    let mut s = s;
    loop {
        if let Some(r) = s.strip_prefix('{') {
            return group(&segs, r);
        }
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        if end == 0 {
            break;
        }
        segs.push(s[..end].to_string());
        s = &s[end..];
        if let Some(r) = s.strip_prefix("::") {
            s = r;
            continue;
        }
        break;
    }
    if segs.is_empty() {
        Vec::new()
    } else {
        vec![segs]
    }
}

/// The members of a `{...}` group (`r` starts after its brace), each
/// after `segs`.
fn group(segs: &[String], r: &str) -> Vec<Vec<String>> {
    let mut depth = 0;
    let mut close = r.len();
    for (i, c) in r.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                close = i;
                break;
            }
            '}' => depth -= 1,
            _ => {}
        }
    }
    let inner = &r[..close];
    let mut members = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                members.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    members.push(&inner[start..]);
    let mut out = Vec::new();
    for m in members {
        let m = m.trim();
        if m == "self" {
            out.push(segs.to_vec());
            continue;
        }
        for tail in expand(m) {
            let mut p = segs.to_vec();
            p.extend(tail);
            out.push(p);
        }
    }
    out
}

/// The module a path names: the longest prefix that is a module (`self`
/// is the group's own module); a crate-root macro maps to its module.
fn target(path: &[String], base: &[String], mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut full: Vec<String> = base.to_vec();
    for s in path {
        if s != "self" {
            full.push(s.clone());
        }
    }
    if base.is_empty() && full.len() == 1 {
        if let Some((_, m)) = MACROS.iter().find(|(name, _)| *name == full[0]) {
            return Some(m.to_string());
        }
    }
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

/// Each module's imports of other modules.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &mods {
        let text = code(file);
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        // `super::` from a file is its parent module; from a mod.rs, the
        // grandparent.
        let mut parent: Vec<String> = module.split("::").map(String::from).collect();
        parent.pop();
        if is_mod_rs && module.is_empty() {
            parent.clear();
        }
        let mut deps = BTreeSet::new();
        for p in paths(&text, "crate::") {
            if let Some(t) = target(&p, &[], &mods) {
                deps.insert(t);
            }
        }
        for p in paths(&text, "super::") {
            if let Some(t) = target(&p, &parent, &mods) {
                deps.insert(t);
            }
        }
        deps.remove(module);
        g.insert(module.clone(), deps);
    }
    g
}

#[test]
fn every_import_goes_to_the_same_layer_or_one_below() {
    let g = graph();
    let mut wrong = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            if layer_of(d) > layer_of(m) {
                wrong.push(format!(
                    "{m} ({}) uses {d} ({})",
                    LAYERS[layer_of(m)].0,
                    LAYERS[layer_of(d)].0
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports running up a layer (docs/architecture.md says where each thing goes):\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn no_module_reaches_itself_through_others() {
    let g = graph();
    // Tarjan's strongly connected components, small enough to do plainly:
    // a module is in a circle when it can reach itself.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = g[from].iter().cloned().collect();
        while let Some(m) = stack.pop() {
            if seen.insert(m.clone()) {
                if let Some(ds) = g.get(&m) {
                    stack.extend(ds.iter().cloned());
                }
            }
        }
        seen
    };
    let mut circles: BTreeSet<Vec<String>> = BTreeSet::new();
    for m in g.keys() {
        let r = reach(m);
        if r.contains(m) {
            let mut circle: Vec<String> =
                r.iter().filter(|o| reach(o).contains(m)).cloned().collect();
            circle.sort();
            circles.insert(circle);
        }
    }
    assert!(
        circles.is_empty(),
        "import circles (each list is modules that reach each other):\n  {}",
        circles
            .iter()
            .map(|c| c.join(", "))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn the_reader_sees_real_imports() {
    // The parser itself: a group, a nested group, `self`, and a macro.
    let p = paths(
        "use crate::{a::{b, c::D}, e}; x = crate::outln!(); use super::{self, f};",
        "crate::",
    );
    let flat: Vec<String> = p.iter().map(|s| s.join("::")).collect();
    assert_eq!(flat, ["a::b", "a::c::D", "e", "outln"]);
    let g = graph();
    assert!(g["commands::verify"].contains("engine::rebuild"));
    assert!(g["engine::rebuild"].contains("store"));
}
