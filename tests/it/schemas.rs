//! One place to read each database object: `supabase/schemas/` holds every
//! object the migrations make, as it stands after the last one, a file per
//! object (docs/migrations.md, "Reading the current definition"). The
//! migrations stay the history `supabase db push` applies; this test keeps
//! the two equal. It applies every migration to one database and every
//! schema file to another, both fresh from the stack's template (Supabase's
//! roles and default privileges, the seed's two tables), dumps both
//! catalogs with pg_dump (owners and grants included: they are the
//! security contract) and compares them object by object.
//!
//! It needs no REST server, so it takes two databases of the local cluster
//! rather than two stacks, even when `USAGE_AGG_TEST_*` names an external
//! PostgREST: it compares the repository's two SQL sources, not a server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::MIGRATIONS;

const SCHEMAS: &str = "supabase/schemas";

/// The schema files in the order they apply: the order Supabase's CLI walks
/// `supabase/schemas/` in (`supabase db diff`), each directory's entries by
/// name, depth first. The numbered directories make it the dependency
/// order: helpers the tables' checks call, tables, functions, triggers.
fn schema_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "sql") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&stack::repo_root().join(SCHEMAS), &mut out);
    out
}

/// Runs SQL files with psql, as a user does, in one session; asserts they
/// all applied.
fn psql(url: &str, files: &[PathBuf]) {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url])
        .current_dir(stack::repo_root());
    for f in files {
        cmd.arg("-f").arg(f);
    }
    let out = cmd.output().expect("run psql");
    assert!(
        out.status.success(),
        "applying {} failed: {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database's catalog as pg_dump writes it, one entry per object: keyed
/// by its type and name from pg_dump's `-- Name: ...; Type: ...` headers,
/// holding its owner and its SQL. pg_dump's own comments, the SET lines
/// between entries and the `\restrict` lines (a random key per dump) are
/// left out, and so are blank lines and trailing spaces; comments inside
/// function bodies stay, being part of what the database stores.
fn catalog(url: &str) -> BTreeMap<String, Vec<String>> {
    let out = Command::new(Path::new(stack::PG_BIN).join("pg_dump"))
        .args(["--schema-only", "-d", url])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("pg_dump writes UTF-8");
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let mut entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        // An entry starts with "--", "-- Name: N; Type: T; Schema: S; Owner: O", "--".
        if let (Some(&"--"), Some(header), Some(&"--")) = (
            lines.get(i),
            lines.get(i + 1).and_then(|l| l.strip_prefix("-- Name: ")),
            lines.get(i + 2),
        ) {
            let name = header.split("; ").next().unwrap_or_default();
            let field = |f: &str| {
                header
                    .split("; ")
                    .find_map(|p| p.strip_prefix(f))
                    .unwrap_or_default()
                    .to_string()
            };
            let base = format!("{} {name}", field("Type: "));
            let mut key = base.clone();
            for n in 2.. {
                if !entries.contains_key(&key) {
                    break;
                }
                key = format!("{base} #{n}");
            }
            entries.insert(key.clone(), vec![format!("owner: {}", field("Owner: "))]);
            current = Some(key);
            i += 3;
            continue;
        }
        let line = lines[i];
        i += 1;
        if line == "-- PostgreSQL database dump complete" {
            // The footer, framed by "--" lines as a header is.
            if let Some(key) = &current {
                let body = entries.get_mut(key).unwrap();
                if body.last().is_some_and(|l| l == "--") {
                    body.pop();
                }
            }
            break;
        }
        let Some(key) = &current else {
            continue; // the preamble: pg_dump's comments and settings
        };
        if line.is_empty()
            || line.starts_with("SET ")
            || line.starts_with("SELECT pg_catalog.set_config(")
            || line.starts_with("\\restrict ")
            || line.starts_with("\\unrestrict ")
        {
            continue;
        }
        entries.get_mut(key).unwrap().push(line.to_string());
    }
    entries
}

/// A line diff of one object's two definitions (a longest common
/// subsequence, with two lines of context), `-` the migrations' side and
/// `+` the schema files'.
fn line_diff(migrated: &[String], declared: &[String]) -> String {
    let (n, m) = (migrated.len(), declared.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if migrated[i] == declared[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && migrated[i] == declared[j] {
            ops.push((' ', &migrated[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', &migrated[i]));
            i += 1;
        } else {
            ops.push(('+', &declared[j]));
            j += 1;
        }
    }
    let near_change = |k: usize| {
        ops[k.saturating_sub(2)..(k + 3).min(ops.len())]
            .iter()
            .any(|(c, _)| *c != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (c, l)) in ops.iter().enumerate() {
        if near_change(k) {
            if skipped {
                out.push_str("      ...\n");
                skipped = false;
            }
            out.push_str(&format!("    {c} {l}\n"));
        } else {
            skipped = true;
        }
    }
    out
}

/// The schema files an object's key points at: those named after a word of
/// it (a function, a table), else after the start of one (an index, a
/// sequence, a constraint named after its table).
fn files_for(key: &str, files: &[PathBuf]) -> String {
    let words: Vec<&str> = key
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let stem = |f: &PathBuf| f.file_stem().unwrap().to_string_lossy().into_owned();
    let root = stack::repo_root();
    let show = |hits: Vec<&PathBuf>| {
        hits.iter()
            .map(|f| f.strip_prefix(&root).unwrap_or(f).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let exact: Vec<&PathBuf> = files
        .iter()
        .filter(|f| words.contains(&stem(f).as_str()))
        .collect();
    if !exact.is_empty() {
        return show(exact);
    }
    let prefix: Vec<&PathBuf> = files
        .iter()
        .filter(|f| {
            words
                .iter()
                .any(|w| w.starts_with(&format!("{}_", stem(f))))
        })
        .collect();
    if prefix.is_empty() {
        "no schema file is named after it".into()
    } else {
        show(prefix)
    }
}

#[test]
fn the_schema_files_hold_what_the_migrations_make() {
    let cluster = stack::Cluster::shared();
    let root = stack::repo_root();

    let migrated = cluster.url(&cluster.create_database());
    for m in MIGRATIONS.iter() {
        // One session per migration, as `psql -f` applies each.
        psql(&migrated, &[root.join(m)]);
    }
    let files = schema_files();
    let declared = cluster.url(&cluster.create_database());
    psql(&declared, &files);

    let from_migrations = catalog(&migrated);
    let from_schemas = catalog(&declared);
    for key in [
        "TABLE usage_aggregation_state",
        "FUNCTION usage_agg_rpc_batch(text, bigint, integer, boolean, integer, bigint)",
        "TRIGGER portal_usage_monthly usage_agg_guard_watermark",
    ] {
        assert!(
            from_migrations.contains_key(key),
            "the migrations' catalog, as read from pg_dump, lacks {key:?}: is the dump read right?"
        );
    }

    let mut report = String::new();
    for (key, lines) in &from_migrations {
        match from_schemas.get(key) {
            None => report.push_str(&format!(
                "\n* {key}: made by the migrations, missing from the schema files (look in: {})\n",
                files_for(key, &files)
            )),
            Some(other) if other != lines => report.push_str(&format!(
                "\n* {key}: differs (look in: {}); - migrations, + schema files:\n{}",
                files_for(key, &files),
                line_diff(lines, other)
            )),
            Some(_) => {}
        }
    }
    for key in from_schemas.keys() {
        if !from_migrations.contains_key(key) {
            report.push_str(&format!(
                "\n* {key}: in the schema files ({}), made by no migration\n",
                files_for(key, &files)
            ));
        }
    }
    assert!(
        report.is_empty(),
        "supabase/schemas/ does not hold what supabase/migrations/ makes. A change to a \
         database object is a new migration AND the object's schema file, both (docs/migrations.md, \
         \"Reading the current definition\"). Objects that differ:\n{report}"
    );
}

/// Each schema file starts by saying what its object is for.
#[test]
fn every_schema_file_starts_with_why() {
    let root = stack::repo_root();
    let silent: Vec<String> = schema_files()
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("-- "))
        .map(|f| f.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert!(
        silent.is_empty(),
        "schema files that do not start with a comment saying what the object is for: {silent:?}"
    );
}
