//! Running the real `lanner` binary from the end-to-end tests.

use std::process::{Command, Output};

/// Runs `lanner ARGS…` and returns what it printed and its exit status.
pub fn lanner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanner"))
        .args(args)
        .output()
        .expect("the lanner binary runs")
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
