//! Per-epoch classification metrics, computed on the host from logits, as Keras 3 reports them.
//!
//! [`MetricsAccumulator`] takes one batch of logits, labels and per-sample weights at a time
//! (plain Rust, f64 accumulation) and [`MetricsAccumulator::finish`] returns [`EpochMetrics`]:
//!
//! * `loss` mirrors Keras 3's `"sum_over_batch_size"` reduction with sample weights
//!   (`class_weight` expanded per sample), averaged over batches weighted by batch size, which
//!   is `sum_i(w_i * loss_i) / N`. Binary tasks use `BinaryCrossentropy(from_logits=True)` on
//!   one logit, multi-class tasks `SparseCategoricalCrossentropy(from_logits=True)`; Keras
//!   computes these in f32, this module in f64.
//! * `accuracy` mirrors Keras 3 passing sample weights to compiled metrics:
//!   `sum_i(w_i * correct_i) / sum_i(w_i)`. Binary predictions use `BinaryAccuracy(threshold=0)`
//!   on logits, multi-class predictions the first arg-max.
//! * Binary tasks also get unweighted precision and recall of class 1 (0 when undefined, like
//!   Keras' `Precision`/`Recall`) and, when scores are kept, the exact ROC AUC (Keras' `AUC`
//!   approximates it with 200 thresholds).
//!
//! The accumulator is serde-serialisable so a checkpoint taken mid-epoch resumes exactly (its
//! floats are stored as shortest round-trip strings, so even NaN and infinities survive JSON).

use serde::{Deserialize, Serialize};

/// Accumulates one epoch (or one evaluation) of predictions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsAccumulator {
    classes: usize,
    keep_scores: bool,
    samples: usize,
    /// `sum_i(w_i * loss_i)`.
    #[serde(with = "exact")]
    weighted_loss: f64,
    /// `sum_i(w_i)`.
    #[serde(with = "exact")]
    weight_sum: f64,
    /// `sum_i(w_i * correct_i)`.
    #[serde(with = "exact")]
    weighted_correct: f64,
    confusion: ConfusionMatrix,
    /// Binary with `keep_scores` only: `(logit, label == 1)` per sample.
    scores: Vec<Scored>,
}

impl MetricsAccumulator {
    /// `classes == 2`: binary task, ONE logit per sample (label 1 = positive, predicted positive
    /// when logit > 0, as Keras `BinaryAccuracy(threshold=0)` on logits).
    /// `classes > 2`: K logits per sample, softmax; predicted class = argmax (first max on ties).
    /// `keep_scores`: keep every (score, label) pair so `finish` can compute ROC AUC (binary
    /// only); used for validation, not for training.
    ///
    /// Panics if `classes < 2`.
    pub fn new(classes: usize, keep_scores: bool) -> Self {
        assert!(classes >= 2, "need 2+ classes, got {classes}");
        Self {
            classes,
            keep_scores,
            samples: 0,
            weighted_loss: 0.0,
            weight_sum: 0.0,
            weighted_correct: 0.0,
            confusion: ConfusionMatrix::new(classes),
            scores: Vec::new(),
        }
    }

    /// `logits`: row-major `[batch, outputs]` where outputs = 1 for binary, K otherwise.
    /// `labels`: class index per sample. `weights`: per-sample weight (Keras `class_weight`
    /// expanded per sample; all 1.0 for validation).
    ///
    /// Panics if lengths disagree or a label is out of range (programming errors).
    pub fn update(&mut self, logits: &[f32], labels: &[usize], weights: &[f32]) {
        let outputs = if self.classes == 2 { 1 } else { self.classes };
        assert_eq!(labels.len(), weights.len(), "one weight per label");
        let expected = labels.len() * outputs;
        assert_eq!(logits.len(), expected, "{outputs} logit(s) per label");
        for ((row, &label), &weight) in logits.chunks_exact(outputs).zip(labels).zip(weights) {
            assert!(label < self.classes, "label {label} out of range");
            let (loss, predicted) = match *row {
                [x] => (binary_cross_entropy(x, label), usize::from(x > 0.0)),
                _ => (softmax_cross_entropy(row, label), argmax(row)),
            };
            let weight = f64::from(weight);
            self.weighted_loss += weight * loss;
            self.weight_sum += weight;
            if predicted == label {
                self.weighted_correct += weight;
            }
            self.confusion.counts[label * self.classes + predicted] += 1;
            if let ([x], true) = (row, self.keep_scores) {
                self.scores.push(Scored(*x, label == 1));
            }
        }
        self.samples += labels.len();
    }

    /// Number of samples seen so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The metrics of everything seen so far (all zero when nothing was seen).
    pub fn finish(&self) -> EpochMetrics {
        let ratio = |num: f64, den: f64| if den == 0.0 { 0.0 } else { num / den };
        let binary = self.classes == 2;
        let count = |t, p| self.confusion.count(t, p) as f64;
        let (tp, fp, fn_) = (count(1, 1), count(0, 1), count(1, 0));
        EpochMetrics {
            loss: ratio(self.weighted_loss, self.samples as f64),
            accuracy: ratio(self.weighted_correct, self.weight_sum),
            samples: self.samples,
            precision: binary.then(|| ratio(tp, tp + fp)),
            recall: binary.then(|| ratio(tp, tp + fn_)),
            // Scores are only kept for binary tasks with `keep_scores`.
            auc: roc_auc(&self.scores),
            confusion: self.confusion.clone(),
        }
    }
}

/// The metrics of one epoch (or one evaluation).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// Keras' reported loss: sum_i(w_i * loss_i) / N  (Keras 3 "sum_over_batch_size" reduction
    /// with sample weights, averaged over batches weighted by batch size — equal to this).
    pub loss: f64,
    /// Keras 3 passes sample weights to compiled metrics: accuracy = sum_i(w_i * correct_i) /
    /// sum_i(w_i)  (0 if sum of weights is 0).
    pub accuracy: f64,
    /// Number of samples the metrics cover.
    pub samples: usize,
    /// Binary only (None for multi-class): precision of the positive class (label 1), at
    /// logit > 0, UNWEIGHTED counts; 0.0 when the denominator is 0 (Keras' Precision returns 0
    /// then).
    pub precision: Option<f64>,
    /// Binary only (None for multi-class): recall of the positive class (label 1), at logit > 0,
    /// UNWEIGHTED counts; 0.0 when the denominator is 0 (Keras' Recall returns 0 then).
    pub recall: Option<f64>,
    /// Binary and keep_scores only: exact ROC AUC (Mann–Whitney U with average ranks for tied
    /// scores), unweighted; None when only one class is present or scores were not kept.
    pub auc: Option<f64>,
    /// Unweighted confusion matrix.
    pub confusion: ConfusionMatrix,
}

/// counts[true_class * classes + predicted_class], unweighted sample counts. For binary,
/// classes = 2.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConfusionMatrix {
    /// Number of classes (rows and columns).
    pub classes: usize,
    /// Row-major `[true_class, predicted_class]` sample counts.
    pub counts: Vec<u64>,
}

impl ConfusionMatrix {
    /// An all-zero `classes × classes` matrix.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// Samples of `true_class` predicted as `predicted`. Panics if either is out of range.
    pub fn count(&self, true_class: usize, predicted: usize) -> u64 {
        let n = self.classes;
        assert!(true_class < n && predicted < n, "class out of range");
        self.counts[true_class * n + predicted]
    }

    /// A text table for a log: a header row "true \ predicted" followed by the class names, one
    /// row per true class, each column right-aligned to its widest cell (the first column
    /// left-aligned). Missing class names fall back to the class index. Lines are joined by
    /// `'\n'`, with no trailing newline. Example for names ["circle","square"]:
    ///
    /// ```text
    /// true \ predicted  circle  square
    /// circle                48       2
    /// square                 3      47
    /// ```
    pub fn render(&self, class_names: &[String]) -> String {
        const CORNER: &str = "true \\ predicted";
        let n = self.classes;
        let names: Vec<String> = (0..n)
            .map(|c| class_names.get(c).cloned().unwrap_or_else(|| c.to_string()))
            .collect();
        let first = names
            .iter()
            .map(|s| s.chars().count())
            .fold(CORNER.len(), usize::max);
        let digits = |t: usize, p: usize| self.count(t, p).to_string().len();
        let widths: Vec<usize> = (0..n)
            .map(|p| {
                (0..n)
                    .map(|t| digits(t, p))
                    .fold(names[p].chars().count(), usize::max)
            })
            .collect();
        let mut out = format!("{CORNER:<first$}");
        for (name, w) in names.iter().zip(&widths) {
            out.push_str(&format!("  {name:>w$}"));
        }
        for (t, name) in names.iter().enumerate() {
            out.push_str(&format!("\n{name:<first$}"));
            for (p, w) in widths.iter().enumerate() {
                out.push_str(&format!("  {:>w$}", self.count(t, p)));
            }
        }
        out
    }
}

/// Binary cross-entropy from a logit, numerically stable: max(x,0) − x·y + ln(1 + exp(−|x|)).
fn binary_cross_entropy(logit: f32, label: usize) -> f64 {
    let x = f64::from(logit);
    let y = if label == 1 { 1.0 } else { 0.0 };
    x.max(0.0) - x * y + (-x.abs()).exp().ln_1p()
}

/// Softmax cross-entropy from logits: logsumexp(logits) − logits[label].
fn softmax_cross_entropy(logits: &[f32], label: usize) -> f64 {
    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    max + sum.ln() - f64::from(logits[label])
}

/// Index of the first maximum.
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate().skip(1) {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Exact ROC AUC via the Mann–Whitney U statistic with average ranks for ties; None unless
/// both classes are present.
fn roc_auc(scores: &[Scored]) -> Option<f64> {
    let positives = scores.iter().filter(|s| s.1).count() as f64;
    let negatives = scores.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut positive_rank_sum = 0.0;
    let mut start = 0;
    while start < sorted.len() {
        let tied = sorted[start..]
            .iter()
            .take_while(|s| s.0 == sorted[start].0);
        // NaN equals nothing, not even itself, so it forms a group of one.
        let end = start + tied.count().max(1);
        // 0-based positions start..end share the average 1-based rank.
        let rank = (start + end + 1) as f64 / 2.0;
        positive_rank_sum += rank * sorted[start..end].iter().filter(|s| s.1).count() as f64;
        start = end;
    }
    Some((positive_rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// A kept binary score: the logit and whether the label is 1.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Scored(#[serde(with = "exact")] f32, bool);

/// Serialises a float as its shortest round-trip decimal string, so JSON checkpoints restore
/// it bit for bit (serde_json's default float parsing may be off by one ulp) and keep
/// non-finite values (which serde_json would write as `null` and then fail to read).
mod exact {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use std::fmt::{Debug, Display};
    use std::str::FromStr;

    pub fn serialize<T: Debug, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value:?}"))
    }

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr<Err: Display>,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn run(k: usize, keep: bool, x: &[f32], y: &[usize], w: &[f32]) -> EpochMetrics {
        let mut acc = MetricsAccumulator::new(k, keep);
        acc.update(x, y, w);
        acc.finish()
    }

    #[test]
    fn binary_loss_matches_hand_computed_bce_with_weights() {
        let (logits, weights) = ([2.0, -1.0, 0.0, 3.0], [1.0, 3.0, 1.0, 3.0]);
        let m = run(2, false, &logits, &[1, 1, 0, 0], &weights);
        // ln(1+e^-2) = 0.1269280110429725, 1 + ln(1+e^-1) = 1.3132616875182228,
        // ln 2 = 0.6931471805599453, 3 + ln(1+e^-3) = 3.048587351573742; weighted sum / 4.
        assert!(close(m.loss, 13.905622308878812 / 4.0), "loss {}", m.loss);
        assert_eq!(m.samples, 4);
        // Correct: samples 0 (w 1) and 2 (w 1) of total weight 8.
        assert!(close(m.accuracy, 0.25), "accuracy {}", m.accuracy);
    }

    #[test]
    fn weighted_accuracy_divides_by_weight_sum() {
        let m = run(2, false, &[1.0, 1.0, -1.0], &[1, 0, 0], &[2.0, 0.5, 1.5]);
        assert!(close(m.accuracy, 3.5 / 4.0));
        let zero = run(2, false, &[1.0], &[1], &[0.0]);
        assert_eq!((zero.accuracy, zero.loss), (0.0, 0.0));
        assert_eq!(MetricsAccumulator::new(3, true).finish().loss, 0.0);
    }

    #[test]
    fn binary_precision_recall_are_unweighted() {
        // TP 2, FP 1, FN 2, TN 1; weights must not matter.
        let (logits, labels) = ([0.5, 2.0, 1.0, -0.5, 0.0, -3.0], [1, 1, 0, 1, 1, 0]);
        let m = run(2, false, &logits, &labels, &[9.0, 1.0, 1.0, 5.0, 1.0, 1.0]);
        assert!(close(m.precision.unwrap(), 2.0 / 3.0));
        assert!(close(m.recall.unwrap(), 0.5));
        let none = run(2, false, &[-1.0], &[0], &[1.0]);
        assert_eq!((none.precision, none.recall), (Some(0.0), Some(0.0)));
    }

    #[test]
    fn auc_matches_mann_whitney_with_ties() {
        let m = run(2, true, &[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1], &[1.0; 4]);
        // Positive/negative pairs won: 0.35>0.1, 0.8>0.1, 0.8>0.4 → 3 of 4.
        assert!(close(m.auc.unwrap(), 0.75));
        let (logits, labels) = ([0.5, 0.5, 0.2, 0.9, 0.5], [1, 0, 0, 1, 0]);
        let tied = run(2, true, &logits, &labels, &[1.0; 5]);
        // Pairs: 0.5 vs {0.5 tie, 0.2 win, 0.5 tie} = 2, 0.9 wins all 3 → 5 of 6.
        assert!(close(tied.auc.unwrap(), 5.0 / 6.0));
    }

    #[test]
    fn auc_none_with_one_class_without_scores_or_multiclass() {
        assert_eq!(run(2, true, &[0.1, 0.9], &[1, 1], &[1.0; 2]).auc, None);
        assert_eq!(run(2, false, &[0.1, 0.9], &[0, 1], &[1.0; 2]).auc, None);
        let m = run(3, true, &[0.0, 1.0, 2.0], &[2], &[1.0]);
        assert_eq!((m.auc, m.precision, m.recall), (None, None, None));
    }

    #[test]
    fn multiclass_cross_entropy_and_first_max_argmax() {
        let logits = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.0];
        let m = run(3, false, &logits, &[2, 1, 1], &[1.0, 2.0, 0.5]);
        // CE: ln(e+e²+e³)−3 = 0.4076059644443806, ln 3 = 1.0986122886681098,
        // ln(2e²+e)−2 = 0.8619948040582512; (1·a + 2·b + 0.5·c) / 3.
        assert!(close(m.loss, 1.0119426479365752), "loss {}", m.loss);
        // Ties pick the first max (class 0), so only the first sample (w 1 of 3.5) is correct.
        assert!(close(m.accuracy, 1.0 / 3.5));
        assert_eq!(m.confusion.counts, vec![0, 0, 0, 2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn confusion_counts_and_render() {
        let mut logits = vec![-1.0; 48];
        logits.extend([1.0; 2].iter().chain(&[-1.0; 3]).chain(&[1.0; 47]));
        let labels: Vec<usize> = [0; 50].into_iter().chain([1; 50]).collect();
        let c = run(2, false, &logits, &labels, &[1.0; 100]).confusion;
        assert_eq!(c.counts, vec![48, 2, 3, 47]);
        assert_eq!(c.count(1, 0), 3);
        let names = ["circle".to_string(), "square".to_string()];
        let expected = "true \\ predicted  circle  square\n\
                        circle                48       2\n\
                        square                 3      47";
        assert_eq!(c.render(&names), expected);
        // Missing names fall back to indices; cells are as narrow as one digit.
        let unnamed = "true \\ predicted  0  1\n\
                       0                 0  0\n\
                       1                 0  0";
        assert_eq!(ConfusionMatrix::new(2).render(&[]), unnamed);
    }

    #[test]
    fn json_round_trip_mid_epoch_resumes_exactly() {
        let logits = [0.3, -1.7, 2.2, 0.0, -0.1];
        let (labels, weights) = ([1, 0, 1, 0, 1], [0.7, 1.3, 2.9, 1.0, 0.1]);
        let straight = run(2, true, &logits, &labels, &weights);
        let mut first = MetricsAccumulator::new(2, true);
        first.update(&logits[..2], &labels[..2], &weights[..2]);
        let json = serde_json::to_string(&first).unwrap();
        let mut resumed: MetricsAccumulator = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed, first);
        resumed.update(&logits[2..], &labels[2..], &weights[2..]);
        assert_eq!(resumed.finish(), straight);
        let back: EpochMetrics =
            serde_json::from_str(&serde_json::to_string(&straight).unwrap()).unwrap();
        assert!(close(back.loss, straight.loss) && back.confusion == straight.confusion);
        // A diverged run (non-finite logits) still checkpoints and restores.
        let mut diverged = MetricsAccumulator::new(2, true);
        diverged.update(&[f32::NAN, f32::INFINITY], &[1, 0], &[1.0, 1.0]);
        let json = serde_json::to_string(&diverged).unwrap();
        let back: MetricsAccumulator = serde_json::from_str(&json).unwrap();
        assert!(back.finish().loss.is_nan() && back.scores[1].0 == f32::INFINITY);
    }

    #[test]
    fn split_batches_equal_one_batch() {
        let logits = [0.2, 1.0, -0.4, 3.0, 0.0, 0.5, -2.0, 1.5, 1.5, 0.1, 0.2, 0.3];
        let (labels, weights) = ([0, 2, 1, 2], [1.0, 0.25, 4.0, 1.0]);
        let mut one = MetricsAccumulator::new(3, true);
        one.update(&logits, &labels, &weights);
        let mut two = MetricsAccumulator::new(3, true);
        two.update(&logits[..3], &labels[..1], &weights[..1]);
        two.update(&logits[3..], &labels[1..], &weights[1..]);
        assert_eq!(two.samples(), 4);
        assert_eq!(two, one);
        assert_eq!(two.finish(), one.finish());
    }

    #[test]
    #[should_panic(expected = "logit(s) per label")]
    fn mismatched_lengths_panic() {
        MetricsAccumulator::new(2, false).update(&[0.0, 1.0], &[0], &[1.0]);
    }
}
