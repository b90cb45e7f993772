//! SageMaker runs `IMAGE train` and `IMAGE serve`: the binary started under those names is
//! `lanner train` and `lanner serve` (docker/Dockerfile links them).

use std::process::Command;

fn run_as(name: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join(name);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_lanner"), &link).unwrap();
    let out = Command::new(&link).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn train_and_serve_links_run_those_commands() {
    assert!(run_as("train", &["--help"]).contains("Usage: lanner train"));
    assert!(run_as("serve", &["--help"]).contains("Usage: lanner serve"));
    // Any other name is the plain CLI.
    assert!(run_as("lanner-renamed", &["--help"]).contains("Commands:"));
}
