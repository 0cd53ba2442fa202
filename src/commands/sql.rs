//! `usage-agg sql`: every migration, in the order they apply, for a user
//! without the repository to paste into Supabase's SQL editor or pipe into
//! psql. Each is idempotent, so printing all of them is safe on a project
//! that has some already.

use crate::exit::Status;
use crate::migrations::MIGRATIONS;

pub fn run() -> Status {
    for (i, (file, sql)) in MIGRATIONS.iter().enumerate() {
        if i > 0 {
            crate::outln!();
        }
        crate::outln!("-- ==== {file} ====");
        crate::out!("{sql}");
    }
    Status::Ok
}
