//! `usage-agg sql`: the migration, for a user without the repository to
//! paste into Supabase's SQL editor or pipe into psql.

use crate::exit::Status;
use crate::state::MIGRATION_SQL;

pub fn run() -> Status {
    print!("{MIGRATION_SQL}");
    Status::Ok
}
