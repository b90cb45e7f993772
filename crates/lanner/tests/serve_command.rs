//! `lanner predict` and `lanner serve` end to end, on a tiny model trained once from scratch
//! on generated shapes: predictions as CSV and JSON Lines, the real server over HTTP
//! (SageMaker hosting and TF Serving's REST API, every content type, errors as clients expect
//! them, batching of concurrent requests, SIGTERM), and a model.tar.gz as SageMaker makes it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{lanner, text};
use image::ImageFormat;
use lanner_data::rng::SplitMix64;
use lanner_data::synthetic::{ShapesSpec, draw_shape, write_shapes};

/// The trained model and the images the tests use.
struct Fixture {
    root: PathBuf,
}

impl Fixture {
    fn model(&self) -> PathBuf {
        self.root.join("model")
    }
    fn images(&self) -> PathBuf {
        self.root.join("data/validation")
    }
    /// A PNG at the model's own size (32×32), so its pixels are the model's input as they are.
    fn exact_png(&self) -> PathBuf {
        self.root.join("exact.png")
    }
    fn jpeg(&self) -> PathBuf {
        self.root.join("data/validation/square/square_00000.jpg")
    }
}

/// Trains the model once for all tests of this file (about a second).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve_command");
        let _ = fs::remove_dir_all(&root);
        let data = root.join("data");
        for (subset, per_class, seed) in [("train", 24, 1), ("validation", 6, 2)] {
            let spec = ShapesSpec {
                per_class,
                width: 40,
                height: 30,
                seed,
                format: ImageFormat::Jpeg,
            };
            write_shapes(&data.join(subset), &spec).unwrap();
        }
        let image = draw_shape(0, 32, 32, &mut SplitMix64::for_stream(9, 0, 0));
        image.save(root.join("exact.png")).unwrap();
        let (train, validation, model) = (
            data.join("train"),
            data.join("validation"),
            root.join("model"),
        );
        let result = lanner(&[
            "train",
            "--train",
            train.to_str().unwrap(),
            "--validation",
            validation.to_str().unwrap(),
            "--model-dir",
            model.to_str().unwrap(),
            "--arch",
            "mobilenet_v3_small_050",
            "--weights",
            "none",
            "--from-scratch",
            "--image-size",
            "32",
            "--batch-size",
            "16",
            "--initial-epochs",
            "2",
            "--fine-tune-epochs",
            "1",
            "--random-rotation",
            "0",
            "--workers",
            "2",
        ]);
        assert!(result.status.success(), "{}", text(&result.stderr));
        Fixture { root }
    })
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `lanner predict --format csv`: the probability of `square` (the second class, which is
/// what TF Serving returns for a binary model) per file.
fn predicted_square_probabilities(model: &Path, inputs: &[&Path]) -> BTreeMap<String, f32> {
    predicted_in(model, inputs, &[])
}

/// [`predicted_square_probabilities`] with more arguments.
fn predicted_in(model: &Path, inputs: &[&Path], more: &[&str]) -> BTreeMap<String, f32> {
    let mut args = vec!["predict", "--model", path_str(model), "--format", "csv"];
    args.extend(more);
    args.extend(inputs.iter().map(|p| path_str(p)));
    let result = lanner(&args);
    assert!(result.status.success(), "{}", text(&result.stderr));
    text(&result.stdout)
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields[0].to_string(), fields[3].parse().unwrap())
        })
        .collect()
}

/// `--precision bf16` on the CPU: on one with AMX, the convolutions run on its tiles and the
/// probabilities stay within bf16's rounding of f32's; on one without, one sentence says so.
#[test]
fn predict_in_bf16_runs_on_amx_or_says_the_cpu_lacks_it() {
    let fx = fixture();
    let (model, images) = (fx.model(), fx.images());
    let bf16 = ["--device", "cpu", "--precision", "bf16"];
    if lanner_models::frozen::cpu_bf16().is_none() {
        let mut args = vec!["predict", "--model", path_str(&model), path_str(&images)];
        args.extend(bf16);
        let result = lanner(&args);
        assert!(!result.status.success());
        let stderr = text(&result.stderr);
        assert!(
            stderr.contains(
                "--precision bf16 on the cpu needs Intel AMX (Xeon Sapphire Rapids or later"
            ),
            "{stderr}"
        );
        eprintln!("this CPU has no AMX: checked the refusal only");
        return;
    }
    let full = predicted_in(&model, &[&images], &["--device", "cpu"]);
    let low = predicted_in(&model, &[&images], &bf16);
    assert_eq!(full.len(), 12);
    assert_eq!(
        full.keys().collect::<Vec<_>>(),
        low.keys().collect::<Vec<_>>()
    );
    let worst = full
        .values()
        .zip(low.values())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst > 0.0 && worst < 0.02, "bf16 off f32 by {worst}");
}

#[test]
fn predict_prints_one_row_per_image_as_csv_and_jsonl() {
    let fx = fixture();
    let bad = fx.root.join("not_an_image.jpg");
    fs::write(&bad, b"this is text").unwrap();
    let model = fx.model();
    let images = fx.images();
    let csv = lanner(&[
        "predict",
        "--model",
        path_str(&model),
        path_str(&images),
        path_str(&bad),
        "--batch-size",
        "5",
    ]);
    // Not a terminal: CSV by default. The bad file is named on stderr and fails the run, but
    // every other row is printed.
    assert!(!csv.status.success());
    let stderr = text(&csv.stderr);
    assert!(
        stderr.contains("not_an_image.jpg': the content is not a JPEG, PNG, BMP or GIF image"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 of 13 images could not be predicted (listed above); fix or remove them, or pass --skip-errors"),
        "{stderr}"
    );
    let stdout = text(&csv.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "path,class,circle,square");
    assert_eq!(lines.len(), 13, "{stdout}");
    // Folders are walked in sorted order.
    assert!(lines[1].contains("circle/circle_00000.jpg"), "{}", lines[1]);
    assert!(
        lines[12].contains("square/square_00005.jpg"),
        "{}",
        lines[12]
    );
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split(',').collect();
        let (p0, p1): (f32, f32) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        assert!((p0 + p1 - 1.0).abs() < 1e-6, "{line}");
        assert_eq!(
            fields[1],
            if p1 >= 0.5 { "square" } else { "circle" },
            "{line}"
        );
    }

    let skipped = lanner(&[
        "predict",
        "--model",
        path_str(&model),
        path_str(&bad),
        path_str(&fx.jpeg()),
        "--skip-errors",
        "--format",
        "jsonl",
        "--threshold",
        "0",
    ]);
    assert!(skipped.status.success(), "{}", text(&skipped.stderr));
    assert!(text(&skipped.stderr).starts_with("skipped: cannot use '"));
    let rows: Vec<serde_json::Value> = text(&skipped.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["path"], path_str(&fx.jpeg()));
    // Threshold 0: the second class whatever the probability.
    assert_eq!(rows[0]["class"], "square");
    let square = rows[0]["probabilities"]["square"].as_f64().unwrap() as f32;
    let from_csv = predicted_square_probabilities(&model, &[&fx.jpeg()]);
    assert_eq!(from_csv[path_str(&fx.jpeg())], square);

    // A folder's files that are not images by their extension are named, not silently dropped.
    let mixed = fx.root.join("mixed");
    fs::create_dir_all(&mixed).unwrap();
    fs::copy(fx.jpeg(), mixed.join("photo.jpg")).unwrap();
    fs::write(mixed.join("photo.webp"), b"RIFF").unwrap();
    let with_other_files = lanner(&["predict", "--model", path_str(&model), path_str(&mixed)]);
    assert!(with_other_files.status.success());
    assert_eq!(text(&with_other_files.stdout).lines().count(), 2);
    assert_eq!(
        text(&with_other_files.stderr).trim_end(),
        format!(
            "Ignored 1 file in '{}' that is not a .jpg, .jpeg, .png, .bmp or .gif image (webp 1); \
             convert it to read it",
            mixed.display()
        )
    );

    let table = lanner(&[
        "predict",
        "--model",
        path_str(&model),
        path_str(&fx.jpeg()),
        "--format",
        "table",
    ]);
    let table = text(&table.stdout);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        vec!["path", "class", "circle", "square"],
        "{table}"
    );
    assert_eq!(lines[1][0], path_str(&fx.jpeg()));
    assert_eq!(lines[1][3], format!("{square:.4}"), "{table}");
}

/// A running `lanner serve`, stopped with SIGTERM when dropped if still running.
struct Server {
    child: Option<Child>,
    url: String,
    agent: ureq::Agent,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lanner"))
            .args(["serve", "--model", path_str(model), "--port", "0"])
            .args(extra)
            .env_remove("SAGEMAKER_BIND_TO_PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(address) = line.trim().strip_prefix("lanner serve: listening on ") else {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("the server did not start: {line}{stderr}");
        };
        assert!(address.starts_with("http://127.0.0.1:"), "{address}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let server = Server {
            child: Some(child),
            url: address.to_string(),
            agent,
        };
        let started = Instant::now();
        while server.get("/ping").0 != 200 {
            assert!(started.elapsed() < Duration::from_secs(30), "never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn get(&self, path: &str) -> (u16, String) {
        match self.agent.get(format!("{}{path}", self.url)).call() {
            Ok(mut response) => (
                response.status().as_u16(),
                response.body_mut().read_to_string().unwrap(),
            ),
            Err(_) => (0, String::new()),
        }
    }

    /// POSTs `body` with these headers; returns status, body and the class-names header.
    fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, String) {
        let mut request = self.agent.post(format!("{}{path}", self.url));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.send(body).unwrap();
        let names = response
            .headers()
            .get("x-lanner-class-names")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap(), names)
    }

    fn post_json(&self, path: &str, json: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, body, _) = self.post(
            path,
            &[("Content-Type", "application/json")],
            json.to_string().as_bytes(),
        );
        (status, serde_json::from_str(&body).unwrap())
    }

    /// SIGTERM, then the exit status and stderr (within `limit`).
    fn terminate(&mut self, limit: Duration) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("lanner serve did not stop within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status.success(), stderr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A bad request: path, headers, body, the status and the start of the error it gets.
type ErrorCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);

/// The `{"error": …}` sentence of an error answer, checked to be one.
fn error_of(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

fn first_prediction(json: &serde_json::Value, key: &str) -> f32 {
    json[key][0][0].as_f64().unwrap() as f32
}

#[test]
fn serve_answers_like_a_sagemaker_tf_serving_endpoint() {
    let fx = fixture();
    let model = fx.model();
    let mut server = Server::start(
        &model,
        &["--max-batch-delay", "50", "--max-body-bytes", "65536"],
    );
    let jpeg = fs::read(fx.jpeg()).unwrap();
    let png = fs::read(fx.exact_png()).unwrap();
    let want = predicted_square_probabilities(&model, &[&fx.jpeg(), &fx.exact_png()]);
    let (want_jpeg, want_png) = (want[path_str(&fx.jpeg())], want[path_str(&fx.exact_png())]);
    let close = |got: f32, want: f32| assert!((got - want).abs() < 1e-5, "{got} vs {want}");

    // SageMaker hosting: each image content type, JSON and CSV answers.
    assert_eq!(server.get("/ping").0, 200);
    for (content_type, body, want) in [
        ("image/jpeg", &jpeg, want_jpeg),
        ("application/x-image", &jpeg, want_jpeg),
        ("image/png", &png, want_png),
    ] {
        let (status, answer, names) =
            server.post("/invocations", &[("Content-Type", content_type)], body);
        assert_eq!(status, 200, "{content_type}: {answer}");
        assert_eq!(names, r#"["circle","square"]"#);
        let json: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(json["predictions"].as_array().unwrap().len(), 1);
        close(first_prediction(&json, "predictions"), want);
    }
    let (status, csv, _) = server.post(
        "/invocations",
        &[("Content-Type", "image/jpeg"), ("Accept", "text/csv")],
        &jpeg,
    );
    assert_eq!(status, 200);
    close(csv.trim().parse().unwrap(), want_jpeg);

    // TF Serving's request: b64 instances, on /invocations and on :predict (both URLs).
    let b64 = |bytes: &[u8]| serde_json::json!({"b64": BASE64.encode(bytes)});
    let request = serde_json::json!({"instances": [b64(&jpeg), b64(&png)]});
    for path in [
        "/invocations",
        "/v1/models/model:predict",
        "/v1/models/model/versions/1:predict",
    ] {
        let (status, json) = server.post_json(path, &request);
        assert_eq!(status, 200, "{path}: {json}");
        close(
            json["predictions"][0][0].as_f64().unwrap() as f32,
            want_jpeg,
        );
        close(json["predictions"][1][0].as_f64().unwrap() as f32, want_png);
    }
    // What `TensorFlowModel.predict(numpy_batch)` sends: [H][W][3] pixels at the model's size,
    // row format, columnar format, and a bare list on /invocations.
    let pixels: Vec<Vec<Vec<u8>>> = {
        let image = image::open(fx.exact_png()).unwrap().to_rgb8();
        (0..32)
            .map(|y| (0..32).map(|x| image.get_pixel(x, y).0.to_vec()).collect())
            .collect()
    };
    let (status, json) = server.post_json(
        "/v1/models/model:predict",
        &serde_json::json!({"instances": [pixels]}),
    );
    assert_eq!(status, 200, "{json}");
    close(first_prediction(&json, "predictions"), want_png);
    let (status, json) = server.post_json(
        "/v1/models/model:predict",
        &serde_json::json!({"inputs": [pixels]}),
    );
    assert_eq!(status, 200, "{json}");
    close(first_prediction(&json, "outputs"), want_png);
    let (status, json) = server.post_json("/invocations", &serde_json::json!([pixels]));
    assert_eq!(status, 200, "{json}");
    close(first_prediction(&json, "predictions"), want_png);

    // TF Serving's status and metadata.
    let (status, body) = server.get("/v1/models/model");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"model_version_status": [{"version": "1", "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})
    );
    let (status, body) = server.get("/v1/models/model/metadata");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["model_spec"]["name"], "model");
    let input =
        &json["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["input_1"];
    assert_eq!(input["tensor_shape"]["dim"][1]["size"], "32");
    assert_eq!(
        json["lanner"]["class_names"],
        serde_json::json!(["circle", "square"])
    );

    // Errors: 4xx with one sentence in {"error": …}, and the server keeps serving.
    let mut corrupt = jpeg[..200.min(jpeg.len())].to_vec();
    corrupt.extend((0..=255u8).cycle().take(1024));
    let cases: Vec<ErrorCase> = vec![
        (
            "/invocations",
            vec![("Content-Type", "image/jpeg")],
            b"hello, I am text".to_vec(),
            400,
            "the request body cannot be used: the content is not a JPEG, PNG, BMP or GIF image",
        ),
        (
            "/invocations",
            vec![("Content-Type", "image/jpeg")],
            corrupt,
            400,
            "the request body cannot be used: the JPEG image is corrupt and cannot be decoded",
        ),
        (
            "/invocations",
            vec![("Content-Type", "text/plain")],
            jpeg.clone(),
            415,
            "Content-Type text/plain is not supported; send image/jpeg, image/png, application/x-image or application/json",
        ),
        (
            "/invocations",
            vec![("Content-Type", "application/json")],
            b"{\"instances\": [".to_vec(),
            400,
            "the request body is not valid JSON",
        ),
        (
            "/v1/models/model:predict",
            vec![],
            b"{\"instances\": [{\"b64\": \"aGVsbG8=\"}]}".to_vec(),
            400,
            "instance 0 cannot be used: the content is not a JPEG, PNG, BMP or GIF image",
        ),
        (
            "/v1/models/model:predict",
            vec![],
            b"{\"instances\": [[[1, 2, 3]]]}".to_vec(),
            400,
            "instance 0: has shape [1, …], but the model takes [32, 32, 3]",
        ),
        (
            "/invocations",
            vec![("Content-Type", "image/png")],
            Vec::new(),
            400,
            "the request body is empty",
        ),
        (
            "/invocations",
            vec![("Content-Type", "application/json")],
            Vec::new(),
            400,
            "the request body is empty",
        ),
        (
            "/invocations",
            vec![("Content-Type", "image/jpeg"), ("Accept", "text/html")],
            jpeg.clone(),
            406,
            "cannot answer in text/html; accept application/json or text/csv",
        ),
        (
            "/v1/models/other:predict",
            vec![],
            b"{}".to_vec(),
            404,
            "Servable not found for request: Latest(other)",
        ),
        (
            "/v1/models/model/versions/7:predict",
            vec![],
            b"{}".to_vec(),
            404,
            "Servable not found for request: Specific(model, 7)",
        ),
    ];
    for (path, headers, body, want_status, want_error) in cases {
        let (status, answer, _) = server.post(path, &headers, &body);
        assert_eq!(status, want_status, "{path} {headers:?}: {answer}");
        let error = error_of(&answer);
        assert!(error.starts_with(want_error), "{path} {headers:?}: {error}");
        // Still serving.
        let (status, _, _) = server.post("/invocations", &[("Content-Type", "image/jpeg")], &jpeg);
        assert_eq!(status, 200);
    }
    // Over --max-body-bytes: refused from Content-Length, before the body is read.
    let host = server.url.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&host).unwrap();
    write!(
        stream,
        "POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains(
            "the request body is larger than 65536 bytes (--max-body-bytes); send smaller or fewer images"
        ),
        "{answer}"
    );
    let (status, body) = server.get("/no/such/route");
    assert_eq!(status, 404);
    assert!(error_of(&body).starts_with("no such route"));

    // Concurrent clients: all answered, and grouped into shared forward passes.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (agent, url, jpeg) = (server.agent.clone(), server.url.clone(), jpeg.clone());
            std::thread::spawn(move || {
                (0..4)
                    .map(|_| {
                        let mut response = agent
                            .post(format!("{url}/invocations"))
                            .header("Content-Type", "image/jpeg")
                            .send(&jpeg[..])
                            .unwrap();
                        let body: serde_json::Value =
                            serde_json::from_str(&response.body_mut().read_to_string().unwrap())
                                .unwrap();
                        (
                            response.status().as_u16(),
                            first_prediction(&body, "predictions"),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for client in clients {
        for (status, p) in client.join().unwrap() {
            assert_eq!(status, 200);
            close(p, want_jpeg);
        }
    }
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let (passes, single) = (
        value("lanner_batch_size_count"),
        value("lanner_batch_size_bucket{le=\"1\"}"),
    );
    assert!(
        single < passes,
        "no forward pass had more than one image:\n{metrics}"
    );
    assert!(value("lanner_requests_total{route=\"/invocations\",status=\"200\"}") >= 32.0);
    assert_eq!(
        value("lanner_requests_total{route=\"/invocations\",status=\"415\"}"),
        1.0
    );
    assert!(
        metrics
            .contains("lanner_request_duration_seconds_bucket{route=\"/invocations\",le=\"+Inf\"}")
    );
    assert_eq!(value("lanner_queue_depth"), 0.0);

    // SIGTERM: a clean, prompt exit.
    let (success, stderr) = server.terminate(Duration::from_secs(10));
    assert!(success, "{stderr}");
    assert!(
        stderr.contains("SIGTERM, finishing in-flight requests"),
        "{stderr}"
    );
}

/// A model.tar.gz as SageMaker uploads it: the model under `1/`.
fn model_tar_gz(model: &Path, archive: &Path) {
    let file = fs::File::create(archive).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    builder.append_dir_all("1", model).unwrap();
    builder.into_inner().unwrap().finish().unwrap();
}

#[test]
fn predicts_and_serves_a_model_tar_gz() {
    let fx = fixture();
    let archive = fx.root.join("model.tar.gz");
    model_tar_gz(&fx.model(), &archive);
    let from_folder = predicted_square_probabilities(&fx.model(), &[&fx.jpeg()]);
    let from_archive = predicted_square_probabilities(&archive, &[&fx.jpeg()]);
    assert_eq!(from_folder, from_archive);

    let mut server = Server::start(&archive, &["--model-name", "shapes"]);
    let (status, json) = server.post_json(
        "/v1/models/shapes:predict",
        &serde_json::json!({"instances": [{"b64": BASE64.encode(fs::read(fx.jpeg()).unwrap())}]}),
    );
    assert_eq!(status, 200, "{json}");
    let want = from_folder[path_str(&fx.jpeg())];
    assert!((first_prediction(&json, "predictions") - want).abs() < 1e-5);

    // SIGTERM while a large request runs: it still gets its answer, then the server exits.
    let image = serde_json::json!({"b64": BASE64.encode(fs::read(fx.jpeg()).unwrap())});
    let request = serde_json::json!({"instances": vec![image; 256]});
    let (agent, url) = (server.agent.clone(), server.url.clone());
    let in_flight = std::thread::spawn(move || {
        let mut response = agent
            .post(format!("{url}/v1/models/shapes:predict"))
            .header("Content-Type", "application/json")
            .send(request.to_string().as_bytes())
            .unwrap();
        let body = response.body_mut().read_to_string().unwrap();
        (response.status().as_u16(), body)
    });
    let started = Instant::now();
    while server
        .get("/metrics")
        .1
        .contains("lanner_images_predicted_total 1\n")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the request never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (success, stderr) = server.terminate(Duration::from_secs(20));
    assert!(success, "{stderr}");
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["predictions"].as_array().unwrap().len(), 256);
}

#[test]
fn a_prediction_over_the_request_timeout_is_a_504() {
    let fx = fixture();
    let server = Server::start(&fx.model(), &["--request-timeout-ms", "1"]);
    // 64 images take far longer than a millisecond to decode and predict.
    let image = serde_json::json!({"b64": BASE64.encode(fs::read(fx.jpeg()).unwrap())});
    let (status, json) = server.post_json(
        "/v1/models/model:predict",
        &serde_json::json!({"instances": vec![image; 64]}),
    );
    assert_eq!(status, 504, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .starts_with("the prediction took longer than 1 ms (--request-timeout-ms)")
    );
    assert_eq!(server.get("/ping").0, 200);
}

#[test]
fn bad_command_lines_end_in_one_clear_sentence() {
    let fx = fixture();
    let jpeg = fx.jpeg();
    let error_line = |args: &[&str]| {
        let result = lanner(args);
        assert!(!result.status.success(), "{args:?} succeeded");
        let stderr = text(&result.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        stderr
    };
    let stderr = error_line(&["predict", "--model", "/no/such/model", path_str(&jpeg)]);
    assert!(
        stderr.starts_with("error: the model '/no/such/model' does not exist; pass the --model-dir of a `lanner train` run or its model.tar.gz"),
        "{stderr}"
    );
    let images = fx.images();
    let stderr = error_line(&["serve", "--model", path_str(&images), "--port", "0"]);
    assert!(
        stderr.contains(
            "holds no Lanner model (no lanner.json at its top or in a single sub-folder)"
        ),
        "{stderr}"
    );
    // An s3:// model needs a region before anything is asked of the network (the S3 model
    // itself is tested against moto_server in fit_command.rs).
    let no_region = std::process::Command::new(env!("CARGO_BIN_EXE_lanner"))
        .args(["serve", "--model", "s3://bucket/model.tar.gz"])
        .args(["--endpoint-url", "http://127.0.0.1:9"])
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .output()
        .unwrap();
    assert!(!no_region.status.success());
    assert_eq!(
        text(&no_region.stderr).trim(),
        "error: no AWS region is configured for S3: pass --region or set AWS_REGION"
    );
    let stderr = error_line(&["predict", "--model", path_str(&fx.model()), "/no/such.jpg"]);
    assert!(stderr.contains("'/no/such.jpg' does not exist"), "{stderr}");
    for command in ["predict", "serve"] {
        let model = fx.model();
        let mut args = vec![command, "--model", path_str(&model), "--precision", "f16"];
        args.extend(["--device", "cpu", "--port", "0"]);
        if command == "predict" {
            args.truncate(7);
            args.push(path_str(&jpeg));
        }
        let stderr = error_line(&args);
        assert!(
            stderr.contains("--precision f16 runs on GPUs; this runs on the cpu"),
            "{stderr}"
        );
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let model = fx.model();
    let result = lanner(&["serve", "--model", path_str(&model), "--port", &port]);
    assert!(!result.status.success());
    let stderr = text(&result.stderr);
    assert!(
        stderr.contains(&format!("error: cannot listen on 127.0.0.1:{port}: "))
            && stderr.contains("stop the program using that port or pass another --port"),
        "{stderr}"
    );
}
