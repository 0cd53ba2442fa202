//! docs/cli.md, the command-line reference: every command's `--help`, as
//! the binary prints it, rendered from the clap definitions (`src/cli.rs`).
//! The test fails when the file is stale; with `USAGE_AGG_UPDATE_DOCS=1` it
//! rewrites it instead. The rendering depends on neither the terminal's
//! width nor its colours: a fixed width, plain text.

use clap::CommandFactory;
use usage_agg::cli::Cli;

/// The width the help is wrapped to: clap's own when it sees no terminal
/// (the binary under cron, in a pipe, in the tests).
pub const WIDTH: usize = 100;

/// The environment variable that makes the test rewrite docs/cli.md.
const UPDATE: &str = "USAGE_AGG_UPDATE_DOCS";

/// Every command, the root first, then each subcommand in the order
/// `--help` lists them (clap's own `help` left out): its words
/// (`["aggregate"]`), its one-line summary, and its `--help` as plain text.
pub fn commands() -> Vec<(Vec<String>, String, String)> {
    let mut root = Cli::command();
    root.build();
    let mut all = Vec::new();
    walk(&root, Vec::new(), &mut all);
    all
}

fn walk(cmd: &clap::Command, words: Vec<String>, all: &mut Vec<(Vec<String>, String, String)>) {
    let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
    all.push((words.clone(), about, help(&words)));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut path = words.clone();
        path.push(sub.get_name().to_string());
        walk(sub, path, all);
    }
}

/// `usage-agg WORDS --help` as the binary answers it, through the same
/// parser (clap prints the long help only where some of it differs from
/// the short one), at [`WIDTH`] columns and without colour.
pub fn help(words: &[String]) -> String {
    let args = std::iter::once("usage-agg")
        .chain(words.iter().map(String::as_str))
        .chain(["--help"]);
    let e = Cli::command()
        .term_width(WIDTH)
        .max_term_width(WIDTH)
        .try_get_matches_from(args)
        .expect_err("--help ends the parse");
    assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{e}");
    plain(&e.render().to_string())
}

/// Help text as a file keeps it: no trailing blanks on any line (clap pads
/// the empty lines of a long help), one newline at the end.
pub fn plain(help: &str) -> String {
    let mut text: String = help
        .lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    while text.ends_with("\n\n") {
        text.pop();
    }
    text
}

fn title(words: &[String]) -> String {
    std::iter::once("usage-agg")
        .chain(words.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// GitHub's anchor for a heading `` `usage-agg aggregate` ``.
fn anchor(words: &[String]) -> String {
    title(words).replace(' ', "-")
}

/// docs/cli.md as the clap definitions make it.
pub fn render() -> String {
    let commands = commands();
    let mut md = String::from(
        "# Command-line reference

Every command's `--help`, as `usage-agg` prints it when it writes to no
terminal (wrapped at 100 columns; on a terminal, at its width up to 100).
`-h` prints a shorter summary of the same options.

Generated from the clap definitions in `src/cli.rs` by
`tests/it/cli_reference.rs`, whose test fails while this file differs from
what they render. Do not edit it by hand; regenerate it:

```
USAGE_AGG_UPDATE_DOCS=1 cargo test --test it cli_reference
```

",
    );
    for (words, about, _) in &commands {
        let indent = if words.is_empty() { "" } else { "  " };
        md.push_str(&format!(
            "{indent}- [`{}`](#{}): {about}\n",
            title(words),
            anchor(words)
        ));
    }
    for (words, _, help) in &commands {
        md.push_str(&format!("\n## `{}`\n\n```text\n{help}```\n", title(words)));
    }
    md
}

#[test]
fn cli_reference_docs_cli_md_is_what_the_clap_definitions_render() {
    let path = stack::repo_root().join("docs/cli.md");
    let want = render();
    if std::env::var_os(UPDATE).is_some_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let first = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| have.lines().count().min(want.lines().count()));
        panic!(
            "docs/cli.md is stale: run `{UPDATE}=1 cargo test --test it cli_reference` to regenerate it \
             (first difference at line {}:\n  file:     {:?}\n  rendered: {:?})",
            first + 1,
            have.lines().nth(first).unwrap_or("<end>"),
            want.lines().nth(first).unwrap_or("<end>")
        );
    }
}

/// The reference is what a person sees: each command's `--help` from the
/// binary itself is the text docs/cli.md holds for it.
#[test]
fn cli_reference_is_what_the_binary_prints() {
    for (words, _, help) in commands() {
        let mut args: Vec<&str> = words.iter().map(String::as_str).collect();
        args.push("--help");
        let run = crate::common::usage_agg(&crate::common::workdir(), &[], &args);
        run.assert_status(0);
        assert_eq!(plain(&run.stdout), help, "usage-agg {}", args.join(" "));
    }
}
