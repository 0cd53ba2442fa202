//! Tables of text for a person (the database's tables are `tables`): the
//! one place that pads columns, so that every table (a dry run's changes,
//! `report`, `quota show`, `alerts list`, `doctor`) and every list of
//! labelled values (`status`, `schedule --show`) lines up by the same
//! rules. Widths count characters, as Rust's
//! own padding does; no crate, so the output stays what the snapshots pin.

/// Which side of its column a cell keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// How wide a column is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// As wide as its widest cell, heading included: the table reads the
    /// same whatever its values.
    Fit,
    /// At least this wide; a longer cell pushes only its own row along (a
    /// fixed layout that a stray long value does not reflow).
    AtLeast(usize),
}

#[derive(Debug, Clone, Copy)]
struct Column {
    align: Align,
    width: Width,
}

/// Rows of cells, drawn with an indent before each line and a gap between
/// columns. The last column of a line is not padded on the right, and no
/// line ends in white space (an empty last cell leaves none for a diff to
/// show).
#[derive(Debug, Clone)]
pub struct Table {
    indent: &'static str,
    gap: &'static str,
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(indent: &'static str, gap: &'static str) -> Table {
        Table {
            indent,
            gap,
            columns: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Adds a column, left to right.
    pub fn column(mut self, align: Align, width: Width) -> Table {
        self.columns.push(Column { align, width });
        self
    }

    /// Adds a row (the heading is the first, when there is one); a cell
    /// past the last column is an error of the caller's.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let row: Vec<String> = cells.into_iter().map(Into::into).collect();
        debug_assert!(row.len() <= self.columns.len(), "{row:?}");
        self.rows.push(row);
    }

    /// The width column `i` is drawn at (before any overflow of one cell).
    pub fn width(&self, i: usize) -> usize {
        match self.columns[i].width {
            Width::AtLeast(n) => n,
            Width::Fit => self
                .rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0),
        }
    }

    /// Every row, each line ending in a newline.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.columns.len()).map(|i| self.width(i)).collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::from(self.indent);
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str(self.gap);
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                let last = i + 1 == row.len();
                match self.columns[i].align {
                    Align::Left => {
                        line.push_str(cell);
                        if !last {
                            line.extend(std::iter::repeat_n(' ', pad));
                        }
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// How wide a summary's labels are (`Cursor:`, `Last success:`): one
/// column for every `status` and `schedule --show` line.
pub const LABEL_WIDTH: usize = 14;

/// Lines of labelled values as a summary shows them, two spaces in:
/// `  Last success:  2026-12-07 ...`. A label is written with its colon;
/// an empty one continues the line above.
pub fn fields<K: AsRef<str>, V: AsRef<str>>(lines: &[(K, V)]) -> String {
    let mut t = Table::new("  ", " ")
        .column(Align::Left, Width::AtLeast(LABEL_WIDTH))
        .column(Align::Left, Width::Fit);
    for (k, v) in lines {
        t.row([k.as_ref(), v.as_ref()]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell_or_keep_their_least_width() {
        let mut t = Table::new("  ", "  ")
            .column(Align::Right, Width::Fit)
            .column(Align::Left, Width::AtLeast(6))
            .column(Align::Left, Width::Fit);
        t.row(["id", "name", "note"]);
        t.row(["1002", "a", ""]);
        t.row(["7", "longer name", "x"]);
        assert_eq!(
            t.render(),
            "    id  name    note\n  1002  a\n     7  longer name  x\n"
        );
        assert_eq!((t.width(0), t.width(1), t.width(2)), (4, 6, 4));
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut t = Table::new("", " ")
            .column(Align::Left, Width::Fit)
            .column(Align::Right, Width::AtLeast(3));
        t.row(["█░", "1"]);
        t.row(["abc", "22"]);
        assert_eq!(t.render(), "█░    1\nabc  22\n");
    }

    #[test]
    fn fields_line_up_after_their_labels() {
        let text = fields(&[
            ("Migration:", "applied"),
            ("Closed months:", "none"),
            ("", "continued"),
        ]);
        assert_eq!(
            text,
            "  Migration:     applied\n  Closed months: none\n                 continued\n"
        );
    }
}
