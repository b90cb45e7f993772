//! Running the real `lanner` binary from the end-to-end tests, and the images they train on.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use image::{Rgb, RgbImage};

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

/// `per_class` images of horizontal and of vertical stripes, random period, phase and
/// colours, under `root/{horizontal,vertical}`.
pub fn stripes(root: &Path, per_class: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |n: u32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as u32
    };
    for class in ["horizontal", "vertical"] {
        let dir = root.join(class);
        fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let period = 4 + next(6);
            let phase = next(period);
            let a = [next(120) as u8, next(120) as u8, next(120) as u8];
            let b = [
                135 + next(120) as u8,
                135 + next(120) as u8,
                135 + next(120) as u8,
            ];
            let image = RgbImage::from_fn(40, 40, |x, y| {
                let along = if class == "horizontal" { y } else { x };
                let noise = next(30) as u8;
                let base = if (along + phase) / (period / 2).max(1) % 2 == 0 {
                    a
                } else {
                    b
                };
                Rgb(base.map(|c| c.saturating_add(noise)))
            });
            image.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

/// `lanner` with no SageMaker variables inherited from the test's environment.
pub fn lanner_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lanner"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("SM_") || name == "SAGEMAKER_BASE_DIR" || name == "TRAINING_JOB_NAME" {
            command.env_remove(name);
        }
    }
    command
}

/// The last line of `bytes` (an error sentence after any warnings).
pub fn last_line(bytes: &[u8]) -> String {
    text(bytes).lines().last().unwrap_or_default().to_string()
}

/// Returns once `child` (stdout piped) prints a line that starts with `prefix`, and goes on
/// reading its stdout to the end on a thread, so that the child never writes into a closed
/// pipe; joining the thread gives the lines after that one.
pub fn wait_for_line(child: &mut Child, prefix: &str) -> JoinHandle<Vec<String>> {
    let stdout = child.stdout.take().expect("the child's stdout is piped");
    let (seen, wait) = mpsc::channel();
    let looked_for = prefix.to_string();
    let reader = thread::spawn(move || {
        let mut after: Option<Vec<String>> = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            match &mut after {
                Some(rest) => rest.push(line),
                None if line.starts_with(&looked_for) => {
                    after = Some(Vec::new());
                    let _ = seen.send(());
                }
                None => {}
            }
        }
        after.unwrap_or_default()
    });
    if wait.recv().is_err() {
        panic!("the child's output ended without a line starting with {prefix:?}");
    }
    reader
}

/// Reads the first line `child` prints (stdout piped), then closes the pipe, as `| head -1`
/// does.
pub fn first_line_then_close(child: &mut Child) -> String {
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("the child's stdout is piped"))
        .read_line(&mut first)
        .unwrap();
    first
}
