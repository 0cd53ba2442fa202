//! Lists `supabase/migrations/*.sql` at build time, in name order (the order
//! they apply), so the binary embeds every migration and a new one needs no
//! edit anywhere else: `state::MIGRATIONS` and the tests read this list.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new("supabase/migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read supabase/migrations")
        .map(|e| e.expect("read supabase/migrations").file_name())
        .map(|n| n.into_string().expect("a migration's name is UTF-8"))
        .filter(|n| n.ends_with(".sql"))
        .collect();
    names.sort();
    let mut out = String::from("&[\n");
    for n in &names {
        println!("cargo:rerun-if-changed=supabase/migrations/{n}");
        let _ = writeln!(
            out,
            "    (\"supabase/migrations/{n}\", include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/supabase/migrations/{n}\"))),"
        );
    }
    out.push(']');
    let path = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("migrations.rs");
    std::fs::write(path, out).expect("write the migration list");
}
