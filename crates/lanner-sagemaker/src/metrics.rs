//! Metric definitions (`NAME=REGEX`) and the values they find in a training log, kept with
//! the time each line was read, as SageMaker reads a training job's log into metrics.

use regex::Regex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::time::{Timestamp, iso};

/// A metric read from the log: the first capture group of `regex`, as a number.
#[derive(Clone, Debug)]
pub struct MetricDefinition {
    pub name: String,
    pub regex: Regex,
}

/// A `--metric-definition` that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MetricDefinitionError {
    #[error(
        "--metric-definition `{0}` has no `=`; write NAME=REGEX, e.g. 'validation \
         accuracy=val_accuracy: ([0-9\\.]+)'"
    )]
    NoEquals(String),
    #[error("--metric-definition `{text}`: the regex does not compile: {problem}")]
    BadRegex { text: String, problem: String },
    #[error(
        "--metric-definition `{0}`: the regex has no capture group; put the number in \
         parentheses, e.g. 'loss: ([0-9\\.]+)'"
    )]
    NoGroup(String),
}

impl MetricDefinition {
    /// Parses `NAME=REGEX` (the name ends at the first `=`).
    pub fn parse(text: &str) -> Result<Self, MetricDefinitionError> {
        let Some((name, regex)) = text.split_once('=') else {
            return Err(MetricDefinitionError::NoEquals(text.to_string()));
        };
        if name.trim().is_empty() {
            return Err(MetricDefinitionError::NoEquals(text.to_string()));
        }
        Self::new(name.trim(), regex).map_err(|error| match error {
            MetricDefinitionError::BadRegex { problem, .. } => MetricDefinitionError::BadRegex {
                text: text.to_string(),
                problem,
            },
            MetricDefinitionError::NoGroup(_) => MetricDefinitionError::NoGroup(text.to_string()),
            other => other,
        })
    }

    /// A definition from its parts.
    pub fn new(name: &str, regex: &str) -> Result<Self, MetricDefinitionError> {
        let compiled = Regex::new(regex).map_err(|error| MetricDefinitionError::BadRegex {
            text: format!("{name}={regex}"),
            // The regex crate's message spans several lines; keep its last, the reason.
            problem: error
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string(),
        })?;
        if compiled.captures_len() < 2 {
            return Err(MetricDefinitionError::NoGroup(format!("{name}={regex}")));
        }
        Ok(Self {
            name: name.to_string(),
            regex: compiled,
        })
    }

    /// The seed's two definitions, which read Lanner's Keras-style epoch lines.
    pub fn seed_defaults() -> Vec<Self> {
        [
            ("validation accuracy", r"val_accuracy: ([0-9\.]+)"),
            ("train accuracy", r" accuracy: ([0-9\.]+)"),
        ]
        .into_iter()
        .map(|(name, regex)| Self::new(name, regex).expect("the seed's regexes compile"))
        .collect()
    }

    /// As the job record lists it (`AlgorithmSpecification.MetricDefinitions`).
    pub fn to_record(&self) -> MetricDefinitionRecord {
        MetricDefinitionRecord {
            name: self.name.clone(),
            regex: self.regex.as_str().to_string(),
        }
    }
}

/// `{"Name": …, "Regex": …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MetricDefinitionRecord {
    pub name: String,
    pub regex: String,
}

/// One value of one metric, `{"MetricName", "Value", "Timestamp"}` as SageMaker lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MetricValue {
    pub metric_name: String,
    pub value: f64,
    pub timestamp: String,
}

/// Every value the definitions found, in log order.
#[derive(Clone, Debug, Default)]
pub struct MetricLog {
    definitions: Vec<MetricDefinition>,
    values: Vec<MetricValue>,
}

impl MetricLog {
    pub fn new(definitions: Vec<MetricDefinition>) -> Self {
        Self {
            definitions,
            values: Vec::new(),
        }
    }

    /// Reads one log line, read at `at`: each definition that matches adds a value (every
    /// match on the line, as SageMaker takes them; text that is not a number is skipped).
    /// Returns how many values the line gave.
    pub fn read_line(&mut self, line: &str, at: &Timestamp) -> usize {
        let before = self.values.len();
        for definition in &self.definitions {
            for captures in definition.regex.captures_iter(line) {
                let Some(text) = captures.get(1) else {
                    continue;
                };
                let Ok(value) = text.as_str().trim_end_matches('.').parse::<f64>() else {
                    continue;
                };
                if value.is_finite() {
                    self.values.push(MetricValue {
                        metric_name: definition.name.clone(),
                        value,
                        timestamp: iso(at),
                    });
                }
            }
        }
        self.values.len() - before
    }

    /// Every value, in log order.
    pub fn values(&self) -> &[MetricValue] {
        &self.values
    }

    /// The last value of each metric, in the definitions' order (`FinalMetricDataList`).
    pub fn final_values(&self) -> Vec<MetricValue> {
        self.definitions
            .iter()
            .filter_map(|definition| {
                self.values
                    .iter()
                    .rev()
                    .find(|value| value.metric_name == definition.name)
                    .cloned()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH_LINE: &str = "Epoch 3/8 - 192/192 samples - 1s - loss: 0.4100 - accuracy: \
                              0.8500 - val_loss: 0.3000 - val_accuracy: 0.9000 - val_auc: 0.9500";

    #[test]
    fn the_seed_definitions_read_an_epoch_line() {
        let mut log = MetricLog::new(MetricDefinition::seed_defaults());
        let at = crate::time::now();
        assert_eq!(
            log.read_line("Training mobilenet_v3_small on 192 images", &at),
            0
        );
        assert_eq!(log.read_line(EPOCH_LINE, &at), 2);
        assert_eq!(
            log.read_line(
                &EPOCH_LINE
                    .replace("0.9000", "0.9500")
                    .replace("0.8500", "0.875"),
                &at
            ),
            2
        );
        let final_values = log.final_values();
        let names_values: Vec<(&str, f64)> = final_values
            .iter()
            .map(|v| (v.metric_name.as_str(), v.value))
            .collect();
        assert_eq!(
            names_values,
            [("validation accuracy", 0.95), ("train accuracy", 0.875)]
        );
        assert_eq!(log.values().len(), 4);
        assert_eq!(log.values()[0].value, 0.9);
        assert_eq!(log.values()[0].timestamp, iso(&at));
    }

    #[test]
    fn a_trailing_full_stop_is_not_part_of_the_number() {
        let mut log = MetricLog::new(MetricDefinition::seed_defaults());
        log.read_line("Best epoch 4: val_accuracy: 1.0000.", &crate::time::now());
        assert_eq!(log.final_values()[0].value, 1.0);
        log.read_line("val_accuracy: ...", &crate::time::now());
        assert_eq!(log.values().len(), 1);
    }

    #[test]
    fn parses_name_equals_regex() {
        let definition = MetricDefinition::parse("val loss=val_loss: ([0-9.]+)").unwrap();
        assert_eq!(definition.name, "val loss");
        assert_eq!(definition.regex.as_str(), "val_loss: ([0-9.]+)");
        let definition = MetricDefinition::parse("eq=a=([0-9]+)").unwrap();
        assert_eq!(definition.regex.as_str(), "a=([0-9]+)");
    }

    #[test]
    fn bad_definitions_say_how_to_fix_them() {
        assert!(matches!(
            MetricDefinition::parse("loss"),
            Err(MetricDefinitionError::NoEquals(_))
        ));
        let error = MetricDefinition::parse("loss=loss: ([0-9.]+")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "--metric-definition `loss=loss: ([0-9.]+`: the regex does not compile: error: \
             unclosed group"
        );
        assert_eq!(
            MetricDefinition::parse("loss=loss: [0-9.]+")
                .unwrap_err()
                .to_string(),
            "--metric-definition `loss=loss: [0-9.]+`: the regex has no capture group; put \
             the number in parentheses, e.g. 'loss: ([0-9\\.]+)'"
        );
    }
}
