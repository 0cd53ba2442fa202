//! The migrations under `supabase/migrations/`, embedded: the one list the
//! code, the tests, the demo and the benchmark use (`build.rs` makes it
//! from the directory, in name order), and which of them introduces a
//! database function, to name in a message when one is missing. The
//! current definition of an object is read in `supabase/schemas/`.

/// The migrations, in the order they apply (name order), with their text;
/// named in every message about them. Listed by `build.rs` from
/// `supabase/migrations/`, so this is the one list. A migration that has
/// shipped is never edited: a change is a new file.
pub const MIGRATIONS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
/// The first migration: its state table says whether usage-agg is installed.
pub const MIGRATION_FILE: &str = MIGRATIONS[0].0;
/// The newest migration.
pub const LATEST_MIGRATION: &str = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The migration that first defines the database function `name`, to name
/// in the message when it is missing; the newest one if none does.
pub fn migration_defining(name: &str) -> &'static str {
    let needle = format!("FUNCTION public.{name}(");
    MIGRATIONS
        .iter()
        .find(|(_, sql)| sql.contains(&needle))
        .map_or(LATEST_MIGRATION, |(file, _)| file)
}

/// The migration that adds periods, named when its functions are missing.
pub const PERIODS_MIGRATION: &str = "supabase/migrations/20261201090000_usage_agg_periods.sql";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_function_is_traced_to_the_migration_that_defines_it() {
        assert_eq!(
            migration_defining("usage_agg_safe_horizon"),
            MIGRATIONS[0].0
        );
        assert_eq!(migration_defining("usage_agg_preflight"), MIGRATIONS[1].0);
        assert_eq!(migration_defining("usage_agg_close_month"), MIGRATIONS[2].0);
        assert_eq!(
            PERIODS_MIGRATION, MIGRATIONS[2].0,
            "the periods module names its migration"
        );
        assert_eq!(
            migration_defining("usage_agg_schedule_show"),
            MIGRATIONS[3].0
        );
        assert_eq!(
            migration_defining("usage_agg_note_rejected"),
            MIGRATIONS[4].0,
            "the tally has a migration of its own: the trust migration is never edited"
        );
        assert_eq!(
            migration_defining("usage_agg_adjust_bound"),
            MIGRATIONS[5].0,
            "the rules of manual adjustments have a migration of their own"
        );
        assert_eq!(migration_defining("usage_agg_adjust"), MIGRATIONS[2].0);
        assert_eq!(migration_defining("no_such_function"), LATEST_MIGRATION);
    }
}
