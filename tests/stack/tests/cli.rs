//! local-stack's command line: help and bad arguments, without starting anything.

#[test]
fn help_prints_the_usage_and_a_bad_argument_exits_64() {
    let bin = env!("CARGO_BIN_EXE_local-stack");
    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: local-stack"));
    let bad = std::process::Command::new(bin)
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("unknown argument --bogus") && !err.contains("panicked"),
        "{err}"
    );
}
