//! TF Serving's JSON request, as a SageMaker TensorFlow endpoint takes it.
//!
//! - Row format: `{"instances": [I, …]}`; columnar: `{"inputs": [I, …]}` (or `{"inputs": I}`
//!   for one). A bare JSON list `[I, …]` is taken as instances on `/invocations`, as
//!   SageMaker's TF Serving container does (the SDK's `predictor.predict(numpy_batch)` sends it).
//! - An instance `I` is image bytes as `{"b64": "…"}`, or pixels as nested numbers of shape
//!   `[H][W][3]` (0..255, the model's own size), either of them optionally under the input's
//!   name (`{"input_1": …}`), the model having one input.
//! - `signature_name` is accepted and ignored: the model has one signature.
//!
//! Row requests are answered with `{"predictions": …}`, columnar ones with `{"outputs": …}`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Map, Value};

/// One image of a request, before preprocessing.
#[derive(Clone, Debug, PartialEq)]
pub enum Instance {
    /// Encoded image bytes (JPEG, PNG, BMP, GIF).
    Image(Vec<u8>),
    /// Interleaved `[H][W][3]` pixel values, already at the model's size.
    Pixels(Vec<f32>),
}

/// Which key the request used, and so which key the response uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `instances` → `predictions`.
    Row,
    /// `inputs` → `outputs`.
    Columnar,
}

impl Layout {
    /// The response's key.
    pub fn response_key(self) -> &'static str {
        match self {
            Layout::Row => "predictions",
            Layout::Columnar => "outputs",
        }
    }
}

/// A parsed prediction request.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictRequest {
    /// The images, in order.
    pub instances: Vec<Instance>,
    /// Row or columnar.
    pub layout: Layout,
}

/// What is wrong with a request body, in one sentence for its sender.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

const EXAMPLE: &str = r#"send {"instances": [{"b64": "<base64 image bytes>"}]}"#;

/// Parses a TF Serving JSON request for a model taking `size`×`size` images. `bare_list`
/// allows a top-level list (SageMaker's `/invocations`).
pub fn parse_predict_json(
    body: &[u8],
    size: usize,
    bare_list: bool,
) -> Result<PredictRequest, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError(format!(
            "the request body is empty; {EXAMPLE}"
        )));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        RequestError(format!(
            "the request body is not valid JSON ({e}); {EXAMPLE}"
        ))
    })?;
    let (items, layout) = match value {
        Value::Array(items) if bare_list => (items, Layout::Row),
        Value::Object(mut object) => {
            object.remove("signature_name");
            match (object.remove("instances"), object.remove("inputs")) {
                (Some(_), Some(_)) => {
                    return Err(RequestError(
                        "the request has both \"instances\" and \"inputs\"; send one of them"
                            .into(),
                    ));
                }
                (Some(Value::Array(items)), None) => (items, Layout::Row),
                (Some(_), None) => {
                    return Err(RequestError(format!(
                        "\"instances\" must be a list of images; {EXAMPLE}"
                    )));
                }
                (None, Some(Value::Array(items))) => (items, Layout::Columnar),
                (None, Some(one @ Value::Object(_))) => (vec![one], Layout::Columnar),
                (None, Some(_)) => {
                    return Err(RequestError(
                        "\"inputs\" must be a list of images or one {\"b64\": ...} image".into(),
                    ));
                }
                (None, None) => {
                    return Err(RequestError(format!(
                        "the JSON has neither \"instances\" nor \"inputs\"; {EXAMPLE}"
                    )));
                }
            }
        }
        _ => {
            return Err(RequestError(format!(
                "the JSON must be an object with \"instances\" or \"inputs\"; {EXAMPLE}"
            )));
        }
    };
    if items.is_empty() {
        return Err(RequestError(format!(
            "the request holds no images; {EXAMPLE}"
        )));
    }
    let instances = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            parse_instance(item, size)
                .map_err(|reason| RequestError(format!("instance {index}: {reason}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(PredictRequest { instances, layout })
}

fn parse_instance(value: Value, size: usize) -> Result<Instance, String> {
    match value {
        Value::Object(object) => parse_object(object, size),
        Value::Array(_) => parse_pixels(&value, size).map(Instance::Pixels),
        Value::String(_) => Err(
            "is a string; send image bytes as {\"b64\": \"<base64>\"} or pixels as [H][W][3] numbers"
                .into(),
        ),
        _ => Err("is not an image; send {\"b64\": \"<base64>\"} or [H][W][3] pixel values".into()),
    }
}

fn parse_object(mut object: Map<String, Value>, size: usize) -> Result<Instance, String> {
    if let Some(b64) = object.remove("b64") {
        let Value::String(text) = b64 else {
            return Err("\"b64\" must be a string of base64 image bytes".into());
        };
        return decode_base64(&text).map(Instance::Image);
    }
    if object.len() == 1 {
        let (_, value) = object.into_iter().next().expect("one entry");
        return parse_instance(value, size);
    }
    let names: Vec<&str> = object.keys().map(String::as_str).collect();
    Err(if names.is_empty() {
        "is an empty object; send {\"b64\": \"<base64>\"}".into()
    } else {
        format!(
            "has several named inputs ({}); the model has one input, the image",
            names.join(", ")
        )
    })
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| "\"b64\" is not valid base64".to_string())
}

/// `[H][W][3]` numbers, checked to be the model's `size`, flattened in order.
fn parse_pixels(value: &Value, size: usize) -> Result<Vec<f32>, String> {
    let want = format!("[{size}, {size}, 3]");
    let shape_error = |got: String| {
        format!(
            "has shape {got}, but the model takes {want} pixel values (or {{\"b64\": ...}} image bytes)"
        )
    };
    let rows = value.as_array().expect("called on a list");
    let mut pixels = Vec::with_capacity(size * size * 3);
    if rows.len() != size {
        return Err(shape_error(format!("[{}, …]", rows.len())));
    }
    for row in rows {
        let Some(row) = row.as_array() else {
            return Err(shape_error(format!("[{size}]")));
        };
        if row.len() != size {
            return Err(shape_error(format!("[{size}, {}, …]", row.len())));
        }
        for pixel in row {
            let Some(pixel) = pixel.as_array() else {
                return Err(shape_error(format!("[{size}, {size}]")));
            };
            if pixel.len() != 3 {
                return Err(shape_error(format!("[{size}, {size}, {}]", pixel.len())));
            }
            for channel in pixel {
                match channel.as_f64() {
                    Some(v) if v.is_finite() => pixels.push(v as f32),
                    _ => {
                        return Err(format!(
                            "holds {channel}, which is not a pixel value (0..255)"
                        ));
                    }
                }
            }
        }
    }
    Ok(pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, bare: bool) -> Result<PredictRequest, String> {
        parse_predict_json(json.as_bytes(), 2, bare).map_err(|e| e.0)
    }

    const PIXELS: &str = "[[[0,1,2],[3,4,5]],[[6,7,8],[9,10,255.0]]]";

    #[test]
    fn row_and_columnar_requests_with_b64_and_pixels() {
        let request = parse(
            r#"{"signature_name": "serving_default", "instances": [{"b64": "aGVsbG8="}, {"input_1": {"b64": "aGk"}}]}"#,
            false,
        )
        .unwrap();
        assert_eq!(request.layout, Layout::Row);
        assert_eq!(
            request.instances,
            vec![
                Instance::Image(b"hello".to_vec()),
                Instance::Image(b"hi".to_vec())
            ]
        );
        let request = parse(&format!(r#"{{"inputs": [{PIXELS}]}}"#), false).unwrap();
        assert_eq!(request.layout, Layout::Columnar);
        assert_eq!(request.layout.response_key(), "outputs");
        let Instance::Pixels(values) = &request.instances[0] else {
            panic!("pixels expected");
        };
        assert_eq!(values.len(), 12);
        assert_eq!(values[11], 255.0);
        let request = parse(r#"{"inputs": {"b64": "aGk="}}"#, false).unwrap();
        assert_eq!(request.instances, vec![Instance::Image(b"hi".to_vec())]);
    }

    #[test]
    fn a_bare_list_only_where_allowed() {
        assert_eq!(
            parse(&format!("[{PIXELS}]"), true).unwrap().instances.len(),
            1
        );
        let error = parse(&format!("[{PIXELS}]"), false).unwrap_err();
        assert!(
            error.starts_with("the JSON must be an object with \"instances\""),
            "{error}"
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases = [
            ("", "the request body is empty"),
            ("{\"instances\": [", "the request body is not valid JSON"),
            (
                "{\"foo\": 1}",
                "the JSON has neither \"instances\" nor \"inputs\"",
            ),
            (
                "{\"instances\": {\"b64\": \"aGk=\"}}",
                "\"instances\" must be a list",
            ),
            ("{\"instances\": []}", "the request holds no images"),
            (
                "{\"instances\": [{\"b64\": \"***\"}]}",
                "instance 0: \"b64\" is not valid base64",
            ),
            (
                "{\"instances\": [{\"b64\": 5}]}",
                "instance 0: \"b64\" must be a string",
            ),
            ("{\"instances\": [\"aGk=\"]}", "instance 0: is a string"),
            (
                "{\"instances\": [{\"a\": 1, \"b\": 2}]}",
                "instance 0: has several named inputs (a, b)",
            ),
            (
                "{\"instances\": [[[[0,0,0]]]]}",
                "instance 0: has shape [1, …], but the model takes [2, 2, 3]",
            ),
            (
                "{\"instances\": [[[[0,0],[0,0]],[[0,0],[0,0]]]]}",
                "instance 0: has shape [2, 2, 2], but the model takes [2, 2, 3]",
            ),
            (
                "{\"instances\": [[[[0,0,\"x\"],[0,0,0]],[[0,0,0],[0,0,0]]]]}",
                "instance 0: holds \"x\", which is not a pixel value",
            ),
            (
                "{\"instances\": [1], \"inputs\": [1]}",
                "the request has both \"instances\" and \"inputs\"",
            ),
        ];
        for (json, want) in cases {
            let error = parse(json, true).unwrap_err();
            assert!(error.starts_with(want), "{json}: {error}");
        }
    }
}
