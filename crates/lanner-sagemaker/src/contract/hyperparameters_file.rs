//! `input/config/hyperparameters.json`: an object whose values SageMaker writes as JSON
//! strings (`{"batch-size": "32", "fine-tune-learning-rate": "1e-05"}`). The SageMaker
//! Python SDK's framework estimators JSON-encode each value first, so a string arrives
//! quoted (`"\"mobilenet\""`); both forms give the same plain value here. `SM_HPS` holds the
//! same hyperparameters decoded (numbers as numbers), which [`decode_value`] also reads.

use std::collections::BTreeMap;

use serde_json::Value;

/// The hyperparameters of `text`, each as the plain string a `--name value` argument takes.
/// The error is a sentence fragment saying what is wrong (the caller names the file).
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, String> {
    let value: Value = serde_json::from_str(text).map_err(|error| {
        format!("{error}; SageMaker writes an object of strings, e.g. {{\"batch-size\": \"32\"}}")
    })?;
    parse_value(&value)
}

/// The hyperparameters of a JSON object (the file's content, or `SM_HPS`).
pub fn parse_value(value: &Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(object) = value else {
        return Err(format!(
            "it holds {} instead of an object of name/value pairs",
            kind(value)
        ));
    };
    object
        .iter()
        .map(|(name, value)| {
            decode_value(value)
                .map(|text| (name.clone(), text))
                .map_err(|problem| format!("hyperparameter `{name}`: {problem}"))
        })
        .collect()
}

/// One value as plain text: a string is read as JSON when it is quoted JSON text (the SDK's
/// encoding of strings and lists) and kept as it is otherwise (`"1e-05"` stays `1e-05`);
/// numbers and booleans as written; a list of scalars joined with commas (`--class-weights
/// 1,2.5`).
pub fn decode_value(value: &Value) -> Result<String, String> {
    match value {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(inner @ (Value::String(_) | Value::Array(_))) => decode_value(&inner),
            _ => Ok(text.clone()),
        },
        Value::Number(number) => Ok(number.to_string()),
        Value::Bool(flag) => Ok(flag.to_string()),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Array(_) | Value::Object(_) | Value::Null => Err(format!(
                    "a list may only hold numbers, strings or booleans, not {}",
                    kind(item)
                )),
                _ => decode_value(item),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|items| items.join(",")),
        Value::Null | Value::Object(_) => Err(format!(
            "{} is not a value; write it as a string, e.g. \"32\"",
            kind(value)
        )),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The file's text for `hyperparameters`: every value a JSON string, as SageMaker writes it.
pub fn to_json(hyperparameters: &BTreeMap<String, String>) -> String {
    let object: serde_json::Map<String, Value> = hyperparameters
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    serde_json::to_string_pretty(&Value::Object(object)).expect("strings serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_values_stay_as_written() {
        let parsed = parse(
            r#"{"batch-size": "32", "fine-tune-learning-rate": "1e-05", "from_scratch": "true",
                "weights": "none"}"#,
        )
        .unwrap();
        assert_eq!(parsed["batch-size"], "32");
        assert_eq!(parsed["fine-tune-learning-rate"], "1e-05");
        assert_eq!(parsed["from_scratch"], "true");
        assert_eq!(parsed["weights"], "none");
    }

    #[test]
    fn quoted_json_as_the_sdk_writes_it_is_unquoted() {
        let parsed = parse(
            r#"{"arch": "\"mobilenet_v3_small\"", "sagemaker_program": "\"train.py\"",
                "class_weights": "[1, 2.5]", "batch-size": "32"}"#,
        )
        .unwrap();
        assert_eq!(parsed["arch"], "mobilenet_v3_small");
        assert_eq!(parsed["sagemaker_program"], "train.py");
        assert_eq!(parsed["class_weights"], "1,2.5");
        assert_eq!(parsed["batch-size"], "32");
    }

    #[test]
    fn plain_numbers_and_booleans_are_accepted() {
        let parsed = parse(r#"{"batch-size": 16, "from-scratch": true, "lr": 0.001}"#).unwrap();
        assert_eq!(parsed["batch-size"], "16");
        assert_eq!(parsed["from-scratch"], "true");
        assert_eq!(parsed["lr"], "0.001");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let error = parse("{\"batch-size\": \"32\"").unwrap_err();
        assert!(error.contains("EOF while parsing"), "{error}");
        assert!(error.ends_with("e.g. {\"batch-size\": \"32\"}"), "{error}");
        assert_eq!(
            parse("[1]").unwrap_err(),
            "it holds a list instead of an object of name/value pairs"
        );
        assert_eq!(
            parse(r#"{"a": {"b": 1}}"#).unwrap_err(),
            "hyperparameter `a`: an object is not a value; write it as a string, e.g. \"32\""
        );
    }

    #[test]
    fn written_values_are_strings_and_read_back() {
        let mut hyperparameters = BTreeMap::new();
        hyperparameters.insert("batch-size".to_string(), "32".to_string());
        hyperparameters.insert("weights".to_string(), "none".to_string());
        let text = to_json(&hyperparameters);
        assert!(text.contains("\"batch-size\": \"32\""), "{text}");
        assert_eq!(parse(&text).unwrap(), hyperparameters);
    }
}
