//! The training program as a child process, as a training container runs it: its output
//! streamed line by line to the terminal (each line prefixed with the job's name) and to the
//! job's log file, every line read by the metric definitions, and a stop request passed on
//! as SageMaker passes it: SIGTERM, then SIGKILL if the program is still running 120 s later.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::metrics::MetricLog;
use crate::time::now;

/// How long a stopped program may take before it is killed (SageMaker's grace period).
pub const STOP_GRACE: Duration = Duration::from_secs(120);

/// What to run.
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Printed before every line on the terminal (`[job-name] `).
    pub prefix: String,
    /// Every line, as printed by the program.
    pub log_file: PathBuf,
}

/// How the program ended.
#[derive(Debug)]
pub struct ChildOutcome {
    pub status: ExitStatus,
    /// Whether a stop was requested (and passed on) before it ended.
    pub stopped: bool,
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Runs `spec` to its end. `metrics` reads every line; `on_metrics` is called after each
/// line that gave a value; `stop` (set by a signal handler) asks the program to stop.
pub fn run(
    spec: &ChildSpec,
    metrics: &mut MetricLog,
    mut on_metrics: impl FnMut(&MetricLog),
    stop: &Arc<AtomicBool>,
) -> Result<ChildOutcome> {
    let mut log = std::fs::File::create(&spec.log_file)
        .with_context(|| format!("cannot create the log file '{}'", spec.log_file.display()))?;
    let mut child = Command::new(&spec.program)
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start the training program '{}'",
                spec.program.display()
            )
        })?;
    let (sender, receiver) = mpsc::channel();
    let readers = [
        child
            .stdout
            .take()
            .map(|out| forward(out, Stream::Stdout, sender.clone())),
        child
            .stderr
            .take()
            .map(|err| forward(err, Stream::Stderr, sender.clone())),
    ];
    drop(sender);

    let mut terminated_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        match receiver.recv_timeout(Duration::from_millis(100)) {
            Ok((stream, line)) => {
                let at = now();
                let _ = writeln!(log, "{line}");
                match stream {
                    Stream::Stdout => {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{}{line}", spec.prefix);
                        let _ = out.flush();
                    }
                    Stream::Stderr => eprintln!("{}{line}", spec.prefix),
                }
                if metrics.read_line(&line, &at) > 0 {
                    on_metrics(metrics);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stop.load(Ordering::Relaxed) && terminated_at.is_none() {
            signal(child.id(), libc::SIGTERM);
            terminated_at = Some(Instant::now());
        }
        if let Some(at) = terminated_at
            && !killed
            && at.elapsed() > STOP_GRACE
        {
            let _ = child.kill();
            killed = true;
        }
    }
    for reader in readers.into_iter().flatten() {
        let _ = reader.join();
    }
    let status = child
        .wait()
        .context("cannot wait for the training program")?;
    Ok(ChildOutcome {
        status,
        stopped: terminated_at.is_some() || stop.load(Ordering::Relaxed),
    })
}

/// Sends each line of `reader` (lossy UTF-8, without its end) to `sender`.
fn forward(
    reader: impl Read + Send + 'static,
    stream: Stream,
    sender: mpsc::Sender<(Stream, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buffer = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut buffer) {
            if n == 0 {
                break;
            }
            // A progress bar redraws with `\r`: keep the last state of the line.
            let text = String::from_utf8_lossy(&buffer);
            let text = text.trim_end_matches(['\n', '\r']);
            let text = text.rsplit('\r').next().unwrap_or_default().to_string();
            buffer.clear();
            if sender.send((stream, text)).is_err() {
                break;
            }
        }
    })
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricDefinition;

    #[test]
    fn streams_logs_and_reads_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ChildSpec {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo 'Epoch 1/1 - loss: 0.5 - accuracy: 0.75 - val_accuracy: 0.5'; echo oops >&2; exit 3".into(),
            ],
            env: vec![],
            prefix: "[job] ".into(),
            log_file: dir.path().join("training.log"),
        };
        let mut metrics = MetricLog::new(MetricDefinition::seed_defaults());
        let mut calls = 0;
        let outcome = run(
            &spec,
            &mut metrics,
            |_| calls += 1,
            &Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        assert_eq!(outcome.status.code(), Some(3));
        assert!(!outcome.stopped);
        assert_eq!(calls, 1);
        assert_eq!(metrics.final_values().len(), 2);
        let log = std::fs::read_to_string(&spec.log_file).unwrap();
        assert!(
            log.contains("accuracy: 0.75") && log.contains("oops"),
            "{log}"
        );
    }

    #[test]
    fn a_stop_request_sends_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ChildSpec {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "trap 'echo terminated; exit 143' TERM; echo started; while :; do sleep 0.05; done"
                    .into(),
            ],
            env: vec![],
            prefix: String::new(),
            log_file: dir.path().join("training.log"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let setter = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            setter.store(true, Ordering::Relaxed);
        });
        let mut metrics = MetricLog::new(vec![]);
        let outcome = run(&spec, &mut metrics, |_| {}, &stop).unwrap();
        assert!(outcome.stopped);
        assert_eq!(outcome.status.code(), Some(143));
        let log = std::fs::read_to_string(&spec.log_file).unwrap();
        assert!(log.contains("terminated"), "{log}");
    }
}
