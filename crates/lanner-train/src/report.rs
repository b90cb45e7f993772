//! What a run tells its user: one [`EpochRecord`] per epoch, the Keras-style log lines the
//! seed's metric regexes read (`val_accuracy: ([0-9\.]+)`, ` accuracy: ([0-9\.]+)`), a
//! progress bar on a terminal, and `metrics.jsonl`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::metrics::EpochMetrics;
use crate::recipe::{Phase, PhaseName};

/// One finished epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based, continuing across phases.
    pub epoch: usize,
    /// Its phase.
    pub phase: PhaseName,
    /// Metrics on the training data (dropout and augmentation on, class-weighted).
    pub train: EpochMetrics,
    /// Metrics on the validation data.
    pub validation: EpochMetrics,
    /// Wall time of the epoch, validation included.
    pub seconds: f64,
    /// Wall time of its training steps.
    pub train_seconds: f64,
    /// Time the training loop waited for the data loader's next batch.
    #[serde(default)]
    pub data_wait_seconds: f64,
    /// Training images per second.
    pub train_images_per_second: f64,
    /// The optimizer's learning rate.
    pub learning_rate: f64,
}

impl EpochRecord {
    /// The flat JSON object of `metrics.jsonl` (Keras' `history` names).
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("epoch".into(), json!(self.epoch));
        object.insert("phase".into(), json!(self.phase.as_str()));
        object.insert("loss".into(), json!(self.train.loss));
        object.insert("accuracy".into(), json!(self.train.accuracy));
        object.insert("val_loss".into(), json!(self.validation.loss));
        object.insert("val_accuracy".into(), json!(self.validation.accuracy));
        for (name, value) in self.binary_validation_metrics() {
            object.insert(name.into(), json!(value));
        }
        object.insert("seconds".into(), json!(self.seconds));
        object.insert("train_seconds".into(), json!(self.train_seconds));
        object.insert("data_wait_seconds".into(), json!(self.data_wait_seconds));
        object.insert("data_wait_share".into(), json!(self.data_wait_share()));
        object.insert(
            "train_images_per_second".into(),
            json!(self.train_images_per_second),
        );
        object.insert("learning_rate".into(), json!(self.learning_rate));
        Value::Object(object)
    }

    /// The share of the training loop's time spent waiting for data: 0 when the loader always
    /// had the next batch ready, near 1 when the steps starved.
    pub fn data_wait_share(&self) -> f64 {
        let total = self.data_wait_seconds + self.train_seconds;
        if total > 0.0 {
            self.data_wait_seconds / total
        } else {
            0.0
        }
    }

    /// The Keras-style metrics part of the epoch line.
    pub fn keras_metrics(&self) -> String {
        let mut line = format!(
            "loss: {:.4} - accuracy: {:.4} - val_loss: {:.4} - val_accuracy: {:.4}",
            self.train.loss, self.train.accuracy, self.validation.loss, self.validation.accuracy
        );
        for (name, value) in self.binary_validation_metrics() {
            line.push_str(&format!(" - {name}: {value:.4}"));
        }
        line
    }

    /// Validation precision, recall and ROC AUC, where the model has them (binary).
    fn binary_validation_metrics(&self) -> impl Iterator<Item = (&'static str, f64)> {
        [
            ("val_precision", self.validation.precision),
            ("val_recall", self.validation.recall),
            ("val_auc", self.validation.auc),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }
}

/// Write every record as one JSON line to `path`, replacing it atomically (a resumed run
/// rewrites the history it continues from, so no epoch appears twice).
pub fn write_metrics_jsonl(path: &Path, history: &[EpochRecord]) -> std::io::Result<()> {
    let mut text = String::new();
    for record in history {
        text.push_str(&record.to_json().to_string());
        text.push('\n');
    }
    crate::tensor_file::write_atomically(path, text.as_bytes())
}

/// Receives the events of a run; [`KerasLog`] prints them.
pub trait Reporter {
    /// Free-form information (phase changes, resumption, warnings).
    fn message(&mut self, text: &str);
    /// A phase starts; `trainable` of `total` parameter elements train.
    fn phase_start(
        &mut self,
        index: usize,
        count: usize,
        phase: &Phase,
        trainable: usize,
        total: usize,
    );
    /// An epoch of `batches` batches starts (or resumes at `first_batch`).
    fn epoch_start(
        &mut self,
        epoch: usize,
        total_epochs: usize,
        batches: usize,
        first_batch: usize,
    );
    /// A training batch is done; `running_loss` is the epoch's loss so far.
    fn batch_end(&mut self, batch: usize, batches: usize, running_loss: f64);
    /// An epoch is done.
    fn epoch_end(&mut self, record: &EpochRecord);
}

/// Keras' console output: `Epoch 4/13`, then one line per epoch with its time and metrics.
/// On a terminal a progress bar with ETA and running loss is redrawn on stderr during the
/// epoch; elsewhere (SageMaker, CI, pipes) only the plain lines appear.
///
/// A closed stdout (`lanner train … | head`, a log reader that died) does not stop training:
/// the log says so once on stderr and goes on without its lines; `metrics.jsonl` and the model
/// are written as before.
pub struct KerasLog {
    progress_bar: bool,
    epoch_started: Instant,
    first_batch: usize,
    stdout_closed: bool,
}

impl KerasLog {
    /// A log with a progress bar when stderr is a terminal.
    pub fn new() -> Self {
        Self::with_progress_bar(std::io::stderr().is_terminal())
    }

    /// A log that draws the progress bar or not.
    pub fn with_progress_bar(progress_bar: bool) -> Self {
        Self {
            progress_bar,
            epoch_started: Instant::now(),
            first_batch: 0,
            stdout_closed: false,
        }
    }

    /// Prints `text` and a newline on stdout, flushed, unless stdout has failed before.
    fn line(&mut self, text: &str) {
        if self.stdout_closed {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        if let Err(error) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
            self.stdout_closed = true;
            let _ = writeln!(
                std::io::stderr(),
                "warning: the training log cannot be written to stdout ({error}); training \
                 goes on without it, and metrics.jsonl and the model are still written"
            );
        }
    }
}

impl Default for KerasLog {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for KerasLog {
    fn message(&mut self, text: &str) {
        self.line(text);
    }

    fn phase_start(
        &mut self,
        index: usize,
        count: usize,
        phase: &Phase,
        trainable: usize,
        total: usize,
    ) {
        self.line(&format!(
            "Phase {}/{count} ({}): {} at learning rate {}, up to {} epochs; {} of {} parameters trainable",
            index + 1,
            phase.name.as_str(),
            phase.optimizer.name(),
            phase.optimizer.learning_rate(),
            phase.epochs,
            thousands(trainable),
            thousands(total),
        ));
    }

    fn epoch_start(
        &mut self,
        epoch: usize,
        total_epochs: usize,
        _batches: usize,
        first_batch: usize,
    ) {
        self.line(&format!("Epoch {epoch}/{total_epochs}"));
        self.epoch_started = Instant::now();
        self.first_batch = first_batch;
    }

    fn batch_end(&mut self, batch: usize, batches: usize, running_loss: f64) {
        if !self.progress_bar {
            return;
        }
        let done = batch + 1;
        let elapsed = self.epoch_started.elapsed().as_secs_f64();
        let per_batch = elapsed / (done - self.first_batch).max(1) as f64;
        let eta = per_batch * (batches - done) as f64;
        let width = 30;
        let filled = width * done / batches.max(1);
        let bar: String = (0..width)
            .map(|i| {
                if i < filled {
                    '='
                } else if i == filled {
                    '>'
                } else {
                    '.'
                }
            })
            .collect();
        eprint!("\r{done}/{batches} [{bar}] - ETA: {eta:.0}s - loss: {running_loss:.4}   ");
        let _ = std::io::stderr().flush();
    }

    fn epoch_end(&mut self, record: &EpochRecord) {
        if self.progress_bar {
            eprint!("\r{:80}\r", "");
        }
        self.line(&format!(
            "{} samples - {:.0}s - {:.1} images/s - waited for data {:.0}% - {}",
            record.train.samples,
            record.seconds,
            record.train_images_per_second,
            100.0 * record.data_wait_share(),
            record.keras_metrics()
        ));
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricsAccumulator;

    #[test]
    fn epoch_lines_match_the_seeds_metric_regexes() {
        let mut train = MetricsAccumulator::new(2, false);
        train.update(&[2.0, -1.0, 0.5, -0.2], &[1, 0, 0, 0], &[1.0; 4]);
        let mut validation = MetricsAccumulator::new(2, true);
        validation.update(&[1.0, -1.0], &[1, 0], &[1.0; 2]);
        let record = EpochRecord {
            epoch: 4,
            phase: PhaseName::FineTune,
            train: train.finish(),
            validation: validation.finish(),
            seconds: 12.0,
            train_seconds: 10.0,
            data_wait_seconds: 2.5,
            train_images_per_second: 0.4,
            learning_rate: 1e-5,
        };
        let line = record.keras_metrics();
        assert!(line.contains(" accuracy: 0.7500"), "{line}");
        assert!(line.contains("val_accuracy: 1.0000"), "{line}");
        let json = record.to_json();
        assert_eq!(json["phase"], "fine_tune");
        assert_eq!(json["val_accuracy"], 1.0);
        assert_eq!(json["val_auc"], 1.0);
        assert_eq!(json["data_wait_seconds"], 2.5);
        assert_eq!(json["data_wait_share"], 0.2);
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
