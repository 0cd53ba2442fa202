//! The assumptions the exactly-once argument rests on, checked before a run
//! counts anything (docs/semantics.md, "Assumptions"). The database reports
//! the facts and judges them, once, for the CLI and the scheduled run alike
//! (`usage_agg_preflight`'s `problems`, from `usage_agg_problems`): each
//! problem's code and its one line (what was found, the likely cause, the
//! repair). This module only tells a code's kind (the schema or the data;
//! `exit.rs` maps kinds to statuses) and whether `--rebase` repairs it.

use std::fmt;

use serde::Deserialize;

/// What `usage_agg_preflight` answers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Facts {
    pub sequence: Option<String>,
    /// None until the sequence hands out its first value (or after a restart).
    pub sequence_last_value: Option<i64>,
    pub sequence_cache: Option<i64>,
    pub id_default: Option<String>,
    pub id_from_sequence: Option<bool>,
    pub newest_id: Option<i64>,
    pub cursor: Option<i64>,
    pub highest_watermark: Option<i64>,
    pub reset_reason: Option<String>,
    pub reset_at: Option<String>,
    pub refused_keys: u64,
    pub refused_since: Option<String>,
    pub refused_examples: Vec<String>,
    /// Of the refused keys, lost writes (docs/semantics.md, "Verdicts").
    /// None: the rule book's migration is not applied.
    pub lost_keys: Option<u64>,
    /// Of the refused keys, closed months' keys a rebase could not book.
    pub closed_refused_keys: Option<u64>,
    pub deleted_keys: u64,
    /// The lease's holder is a run in the database whose backend is gone.
    pub lease_holder_gone: Option<bool>,
    /// Whether portal_usage_monthly has UNIQUE(portal_id, month_year).
    pub unique_key: Option<bool>,
    /// The database's judgement of these facts; None before the rule-book
    /// migration, which judges them.
    pub problems: Option<Vec<Problem>>,
}

/// An assumption found broken, as the database judged it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Problem {
    pub code: String,
    pub message: String,
}

/// The code of the one problem the database cannot report itself: it
/// predates the judgement.
pub const RULE_BOOK_MISSING: &str = "rule_book_missing";

/// What a problem is about, which decides who acts and how soon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The data and the job's state: a rebase or a setval repairs it.
    Data,
    /// The schema: fix the table or the sequence, then run again.
    Schema,
}

impl Problem {
    /// A code this binary does not know (a newer database's check) is
    /// taken as a schema problem: the run refuses, and says what the
    /// database said.
    pub fn kind(&self) -> ProblemKind {
        match self.code.as_str() {
            "sequence_behind_cursor" | "ids_above_sequence" | "table_reset" => ProblemKind::Data,
            _ => ProblemKind::Schema,
        }
    }

    /// Whether `aggregate --rebase` is the repair (and so may run despite it).
    pub fn rebase_repairs(&self) -> bool {
        matches!(self.code.as_str(), "sequence_behind_cursor" | "table_reset")
    }

    /// A short name for JSON and logs.
    pub fn code(&self) -> &str {
        &self.code
    }
}

/// One line: what was found; the likely cause; the repair.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Every broken assumption the database found in its facts.
pub fn problems(f: &Facts) -> Vec<Problem> {
    match &f.problems {
        Some(p) => p.clone(),
        None => vec![Problem {
            code: RULE_BOOK_MISSING.into(),
            message: format!(
                "the database does not judge its own facts: {} is missing (the rule book), and no \
                 engine can book rows without it; repair: apply every migration not yet applied, in \
                 order: `usage-agg sql | psql \"$DATABASE_URL\"` applies them all (each may run \
                 again), or `supabase db push`",
                crate::migrations::migration_defining("usage_agg_book")
            ),
        }],
    }
}

/// A run refused before counting anything: the problems, one a line.
#[derive(Debug, thiserror::Error)]
pub struct Refused(pub Vec<Problem>);

impl Refused {
    /// The gravest problem's kind: a schema fix comes before a rebase.
    pub fn kind(&self) -> ProblemKind {
        self.0
            .iter()
            .map(Problem::kind)
            .max()
            .unwrap_or(ProblemKind::Data)
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refused to count: ")?;
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\nrefused to count: ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(code: &str) -> Problem {
        Problem {
            code: code.into(),
            message: format!("{code}: found; repair: ..."),
        }
    }

    #[test]
    fn each_code_has_its_kind_and_only_two_are_repaired_by_a_rebase() {
        use ProblemKind::{Data, Schema};
        for (code, kind, rebase) in [
            ("no_sequence", Schema, false),
            ("id_default_not_sequence", Schema, false),
            ("sequence_cache", Schema, false),
            ("sequence_behind_cursor", Data, true),
            ("ids_above_sequence", Data, false),
            ("table_reset", Data, true),
            ("a_check_of_a_newer_database", Schema, false),
            (RULE_BOOK_MISSING, Schema, false),
        ] {
            let p = problem(code);
            assert_eq!((p.kind(), p.rebase_repairs()), (kind, rebase), "{code}");
        }
        let mixed = Refused(vec![problem("table_reset"), problem("no_sequence")]);
        assert_eq!(mixed.kind(), Schema);
        assert_eq!(Refused(vec![problem("table_reset")]).kind(), Data);
    }

    #[test]
    fn the_databases_judgement_is_read_and_its_absence_names_the_migration() {
        let f: Facts = serde_json::from_value(serde_json::json!({
            "problems": [{"code": "sequence_cache", "exit": 78, "message": "the sequence x; repair: y"}]
        }))
        .unwrap();
        let p = problems(&f);
        assert_eq!(p[0].to_string(), "the sequence x; repair: y");
        assert!(problems(&Facts::default())[0]
            .to_string()
            .contains("20261207100000_usage_agg_rule_book.sql"));
        assert_eq!(
            problems(&Facts {
                problems: Some(vec![]),
                ..Facts::default()
            }),
            vec![]
        );
    }
}
