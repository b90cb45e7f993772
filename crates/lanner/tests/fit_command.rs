//! `lanner fit` (a local-mode training job) and `lanner jobs`, end to end: channels from
//! folders and from S3 (a real `moto_server`), the job folder with SageMaker's layout and
//! files, `lanner train` run as the training toolkit runs it, metrics read from its log,
//! the archives, `job.json` as DescribeTrainingJob shows a job, failures and bad input.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{first_line_then_close, lanner_command, last_line, stripes, text};

/// The recipe of the other e2e tests: from scratch, tiny, a few seconds.
const HYPERPARAMETERS: &[&str] = &[
    "arch=mobilenet_v3_small_050",
    "weights=none",
    "from-scratch=true",
    "image-size=32",
    "batch-size=16",
    "initial-epochs=2",
    "fine-tune-epochs=1",
    "learning-rate=0.003",
    "random-rotation=0",
    "patience=10",
    "workers=2",
];

fn dataset(root: &Path) {
    stripes(&root.join("train"), 32, 1);
    stripes(&root.join("validation"), 8, 2);
}

/// The arguments of a local job on the channels that `dataset` wrote in `data`, with its job
/// folder in `output`, then `more`.
fn local_job(data: &Path, output: &Path, more: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--train".to_string(),
        data.join("train").display().to_string(),
        "--validation".to_string(),
        data.join("validation").display().to_string(),
        "--output".to_string(),
        output.display().to_string(),
    ];
    args.extend(more.iter().map(|arg| arg.to_string()));
    args
}

fn fit<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    fit_command(args, env).output().unwrap()
}

/// `lanner fit ARGS… -p HYPERPARAMETERS…` with `env`, and no S3 endpoint from the test's own
/// environment.
fn fit_command<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Command {
    let mut command = lanner_command();
    command.arg("fit").args(args);
    for name in ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"] {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    for hyperparameter in HYPERPARAMETERS {
        command.args(["-p", hyperparameter]);
    }
    command
}

fn jobs(args: &[&str]) -> Output {
    jobs_with(args, &[])
}

fn jobs_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = lanner_command();
    command.arg("jobs").args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Every file under `root` with its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(snapshot(&path));
        } else {
            files.insert(path.clone(), fs::read(&path).unwrap());
        }
    }
    files
}

/// The file names in a .tar.gz, by the system's tar.
fn archive_files(archive: &Path) -> Vec<String> {
    let listed = Command::new("tar")
        .arg("-tzf")
        .arg(archive)
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let mut names: Vec<String> = text(&listed.stdout)
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn a_local_job_trains_records_and_packs_like_sagemaker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let before = snapshot(&data);
    let output = dir.path().join("jobs");
    let output_arg = output.to_str().unwrap();
    let result = fit(
        &local_job(&data, &output, &["--job-name", "stripes-1"]),
        &[],
    );
    let stdout = text(&result.stdout);
    let stderr = text(&result.stderr);
    assert!(result.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("[stripes-1] Epoch 3/3"), "{stdout}");
    assert!(stderr.contains("[stripes-1] Channel train: "), "{stderr}");
    assert!(
        stdout.contains("Training job stripes-1 completed."),
        "{stdout}"
    );

    // The job folder holds SageMaker's layout and files.
    let job = output.join("stripes-1");
    let hyperparameters = json(&job.join("input/config/hyperparameters.json"));
    assert_eq!(hyperparameters["batch-size"], "16");
    assert_eq!(hyperparameters["from-scratch"], "true");
    let channels = json(&job.join("input/config/inputdataconfig.json"));
    assert_eq!(
        channels["train"],
        serde_json::json!({"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"})
    );
    let resources = json(&job.join("input/config/resourceconfig.json"));
    assert_eq!(resources["current_host"], "algo-1");
    assert_eq!(resources["hosts"], serde_json::json!(["algo-1"]));
    assert_eq!(resources["current_group_name"], "homogeneousCluster");
    assert_eq!(resources["current_instance_type"], "local");
    assert!(job.join("input/data/train/horizontal/000.png").is_file());
    assert!(job.join("input/data/validation/vertical/007.png").is_file());
    assert!(job.join("model/lanner.json").is_file());
    assert!(job.join("output/data/metrics.jsonl").is_file());
    assert!(
        fs::read_dir(job.join("checkpoints"))
            .unwrap()
            .next()
            .is_some(),
        "checkpoints/ turns on checkpoints"
    );
    assert_eq!(
        archive_files(&job.join("model.tar.gz")),
        ["lanner.json", "weights.safetensors"]
    );
    assert_eq!(archive_files(&job.join("output.tar.gz")), ["metrics.jsonl"]);
    let log = fs::read_to_string(job.join("training.log")).unwrap();
    assert!(
        log.contains("Epoch 1/3") && log.contains("Saved the model"),
        "{log}"
    );

    // The record, as DescribeTrainingJob shows a job.
    let record = json(&job.join("job.json"));
    assert_eq!(record["TrainingJobName"], "stripes-1");
    assert_eq!(record["TrainingJobStatus"], "Completed");
    assert_eq!(record["SecondaryStatus"], "Completed");
    assert_eq!(record["HyperParameters"]["arch"], "mobilenet_v3_small_050");
    let statuses: Vec<&str> = record["SecondaryStatusTransitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["Status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "Starting",
            "Downloading",
            "Training",
            "Uploading",
            "Completed"
        ]
    );
    let train_uri = record["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
        .as_str()
        .unwrap();
    assert_eq!(
        train_uri,
        format!("file://{}", data.join("train").display())
    );
    assert_eq!(
        record["ModelArtifacts"]["S3ModelArtifacts"],
        format!("file://{}", job.join("model.tar.gz").display())
    );
    assert!(
        record["TrainingStartTime"].as_str().unwrap()
            <= record["TrainingEndTime"].as_str().unwrap()
    );
    // The default metric definitions read every epoch line.
    let final_metrics = record["FinalMetricDataList"].as_array().unwrap();
    let names: Vec<&str> = final_metrics
        .iter()
        .map(|m| m["MetricName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["validation accuracy", "train accuracy"]);
    for metric in final_metrics {
        assert!((0.0..=1.0).contains(&metric["Value"].as_f64().unwrap()));
        assert!(metric["Timestamp"].as_str().unwrap().ends_with('Z'));
    }
    let series = record["MetricData"].as_array().unwrap();
    let count = |name: &str| series.iter().filter(|m| m["MetricName"] == name).count();
    assert_eq!(count("train accuracy"), 3);
    assert!(count("validation accuracy") >= 3, "{series:?}");

    // The user's data is as it was.
    assert_eq!(snapshot(&data), before);

    // `lanner jobs`.
    let listed = jobs(&["list", "--output", output_arg]);
    assert!(listed.status.success());
    let listed = text(&listed.stdout);
    assert!(
        listed.lines().next().unwrap().starts_with("name"),
        "{listed}"
    );
    let line = listed.lines().find(|l| l.starts_with("stripes-1")).unwrap();
    assert!(
        line.contains("Completed") && line.contains("validation accuracy="),
        "{listed}"
    );
    let described = jobs(&["describe", "stripes-1", "--output", output_arg]);
    assert!(described.status.success());
    let described = text(&described.stdout);
    for expected in [
        "Status:            Completed (Completed)",
        "Channel train:     file://",
        "batch-size=16",
        "Model artifacts:   file://",
        "validation accuracy:",
    ] {
        assert!(described.contains(expected), "{expected} in\n{described}");
    }
    let logs = jobs(&["logs", "stripes-1", "--output", output_arg]);
    assert_eq!(text(&logs.stdout), log);
    // A long log whose reader stops after a line (`| head -1`) ends without an error.
    fs::write(
        job.join("training.log"),
        log.repeat(1 + (1 << 20) / log.len()),
    )
    .unwrap();
    let mut reader = lanner_command()
        .args(["jobs", "logs", "stripes-1", "--output", output_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    first_line_then_close(&mut reader);
    let read_once = reader.wait_with_output().unwrap();
    assert!(read_once.status.success(), "{}", text(&read_once.stderr));
    fs::write(job.join("training.log"), &log).unwrap();
    let missing = jobs(&["describe", "stripes-9", "--output", output_arg]);
    assert!(!missing.status.success());
    assert!(
        last_line(&missing.stderr)
            .starts_with("error: there is no training job named stripes-9 in ")
    );

    // A second job of that name is refused, and the first is left as it was.
    let job_before = fs::read(job.join("job.json")).unwrap();
    let again = fit(
        &[
            "--train",
            data.join("train").to_str().unwrap(),
            "--output",
            output_arg,
            "--job-name",
            "stripes-1",
        ],
        &[],
    );
    assert!(!again.status.success());
    let message = last_line(&again.stderr);
    assert!(
        message.starts_with("error: a training job named stripes-1 already exists in '")
            && message.contains("choose another --job-name"),
        "{message}"
    );
    assert_eq!(fs::read(job.join("job.json")).unwrap(), job_before);
}

#[test]
fn a_closed_stdout_does_not_fail_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let output = dir.path().join("jobs");
    // As `lanner fit … | head -1`: the reader goes away after the first line.
    let mut child = fit_command(&local_job(&data, &output, &["--job-name", "unread"]), &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = first_line_then_close(&mut child);
    assert!(first.starts_with("[unread] "), "{first}");
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success(), "{}", text(&result.stderr));
    let record = json(&output.join("unread/job.json"));
    assert_eq!(record["TrainingJobStatus"], "Completed");
    assert!(output.join("unread/model.tar.gz").is_file());
}

#[test]
fn a_failing_job_is_recorded_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let output = dir.path().join("jobs");
    let output_arg = output.to_str().unwrap();
    let result = fit(
        &local_job(
            &data,
            &output,
            &[
                "--base-job-name",
                "broken",
                "-p",
                "fine-tune-learning-rate=-1",
            ],
        ),
        &[],
    );
    assert!(!result.status.success());
    let message = last_line(&result.stderr);
    assert!(
        message.starts_with("error: training job broken-20"),
        "{message}"
    );
    assert!(
        message.ends_with(
            "failed: AlgorithmError: --fine-tune-learning-rate must be a positive number, got -1 (exit code 1)"
        ),
        "{message}"
    );
    let records: Vec<PathBuf> = fs::read_dir(&output)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(records.len(), 1);
    let name = records[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        name.len(),
        "broken-".len() + "2024-05-01-12-30-07-045".len()
    );
    let record = json(&records[0].join("job.json"));
    assert_eq!(record["TrainingJobStatus"], "Failed");
    assert_eq!(
        record["FailureReason"],
        "AlgorithmError: --fine-tune-learning-rate must be a positive number, got -1 (exit code 1)"
    );
    assert!(record.get("ModelArtifacts").is_none());
    assert_eq!(
        fs::read_to_string(records[0].join("output/failure")).unwrap(),
        "--fine-tune-learning-rate must be a positive number, got -1"
    );
    assert_eq!(
        archive_files(&records[0].join("output.tar.gz")),
        Vec::<String>::new()
    );
    let described = text(&jobs(&["describe", &name, "--output", output_arg]).stdout);
    assert!(
        described.contains("Status:            Failed (Failed)"),
        "{described}"
    );
    assert!(
        described.contains("Failure reason:    AlgorithmError: --fine-tune-learning-rate"),
        "{described}"
    );
}

#[test]
fn bad_input_is_refused_in_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let output = dir.path().join("jobs");
    let train = data.join("train");
    let refused = |args: &[&str]| {
        let mut all = vec!["--output", output.to_str().unwrap()];
        all.extend(args);
        let result = fit(&all, &[]);
        assert!(!result.status.success(), "{args:?}");
        let stderr = text(&result.stderr);
        assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
        stderr.trim_end().to_string()
    };
    let missing = data.join("nope");
    assert_eq!(
        refused(&["--train", missing.to_str().unwrap()]),
        format!(
            "error: the train channel's data '{}' does not exist; pass an existing folder or an s3:// URI",
            missing.display()
        )
    );
    assert_eq!(
        refused(&["--validation", train.to_str().unwrap()]),
        "error: no training data: pass --train DIR or --train s3://bucket/prefix"
    );
    assert_eq!(
        refused(&[
            "--train",
            train.to_str().unwrap(),
            "--metric-definition",
            "loss=loss: ([0-9.]+"
        ]),
        "error: --metric-definition `loss=loss: ([0-9.]+`: the regex does not compile: error: unclosed group"
    );
    assert!(
        refused(&[
            "--train",
            train.to_str().unwrap(),
            "--metric-definition",
            "loss"
        ])
        .starts_with("error: --metric-definition `loss` has no `=`; write NAME=REGEX")
    );
    assert_eq!(
        refused(&["--train", train.to_str().unwrap(), "--channel", "test"]),
        "error: --channel `test` is not NAME=VALUE; write e.g. --channel test=data/test"
    );
    assert_eq!(
        refused(&["--train", train.to_str().unwrap(), "--job-name", "my_job"]),
        "error: `my_job` is not a valid training job name: use 1 to 63 letters, digits and \
         hyphens, starting and ending with a letter or digit"
    );
    assert!(!output.exists(), "no job was created");
}

/// A `moto_server` on a free port of 127.0.0.1, stopped when dropped.
struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto, or says how to install it (`None` when LANNER_SKIP_S3_TESTS=1).
fn moto() -> Option<Moto> {
    let installed = Command::new("python3")
        .args(["-c", "import moto.server"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        if std::env::var("LANNER_SKIP_S3_TESTS").as_deref() == Ok("1") {
            eprintln!("skipping the S3 test: LANNER_SKIP_S3_TESTS=1 and moto is not installed");
            return None;
        }
        panic!(
            "the S3 tests need moto's server: pip install 'moto[server]' (or set \
             LANNER_SKIP_S3_TESTS=1 to skip them)"
        );
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let moto = Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "moto_server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}

/// An S3 client of the test's own, for setting up and checking the bucket.
fn s3_client(url: &str) -> (tokio::runtime::Runtime, aws_sdk_s3::Client) {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .force_path_style(true)
        .http_client(http)
        .build();
    (runtime, aws_sdk_s3::Client::from_conf(config))
}

#[test]
fn a_job_reads_its_channels_from_s3_and_uploads_its_model_there() {
    let Some(moto) = moto() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let (runtime, s3) = s3_client(&moto.url);
    runtime.block_on(async {
        s3.create_bucket().bucket("lanner").send().await.unwrap();
        for (path, _) in snapshot(&data) {
            let key = format!(
                "datasets/stripes/{}",
                path.strip_prefix(&data).unwrap().display()
            );
            let body = aws_sdk_s3::primitives::ByteStream::from_path(&path)
                .await
                .unwrap();
            s3.put_object()
                .bucket("lanner")
                .key(key)
                .body(body)
                .send()
                .await
                .unwrap();
        }
    });
    let cache = dir.path().join("cache");
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ("LANNER_CACHE_DIR", cache.to_str().unwrap()),
    ];
    let result = fit(
        &[
            "--train",
            "s3://lanner/datasets/stripes/train",
            "--validation",
            "s3://lanner/datasets/stripes/validation/",
            "--output",
            "s3://lanner/jobs",
            "--job-name",
            "from-s3",
            "--endpoint-url",
            &moto.url,
        ],
        &env,
    );
    let stderr = text(&result.stderr);
    assert!(
        result.status.success(),
        "{}\n{stderr}",
        text(&result.stdout)
    );
    assert!(
        stderr.contains(
            "[from-s3] Channel train: s3://lanner/datasets/stripes/train (64 files downloaded)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("Uploaded"), "{stderr}");

    // The artifacts are where SageMaker puts them, and the job folder is in the cache.
    let keys: Vec<String> = runtime.block_on(async {
        let listed = s3
            .list_objects_v2()
            .bucket("lanner")
            .prefix("jobs/")
            .send()
            .await
            .unwrap();
        listed
            .contents()
            .iter()
            .map(|o| o.key().unwrap().to_string())
            .collect()
    });
    assert_eq!(
        keys,
        [
            "jobs/from-s3/output/model.tar.gz",
            "jobs/from-s3/output/output.tar.gz"
        ]
    );
    let job = cache.join("jobs/from-s3");
    let record = json(&job.join("job.json"));
    assert_eq!(record["TrainingJobStatus"], "Completed");
    assert_eq!(
        record["ModelArtifacts"]["S3ModelArtifacts"],
        "s3://lanner/jobs/from-s3/output/model.tar.gz"
    );
    assert_eq!(
        record["OutputDataConfig"]["S3OutputPath"],
        "s3://lanner/jobs"
    );
    assert_eq!(
        record["InputDataConfig"][1]["DataSource"]["S3DataSource"]["S3Uri"],
        "s3://lanner/datasets/stripes/validation/"
    );
    let downloaded = dir.path().join("downloaded.tar.gz");
    runtime.block_on(async {
        let object = s3
            .get_object()
            .bucket("lanner")
            .key("jobs/from-s3/output/model.tar.gz")
            .send()
            .await
            .unwrap();
        fs::write(
            &downloaded,
            object.body.collect().await.unwrap().into_bytes(),
        )
        .unwrap();
    });
    assert_eq!(
        archive_files(&downloaded),
        ["lanner.json", "weights.safetensors"]
    );
    assert_eq!(
        fs::read(&downloaded).unwrap(),
        fs::read(job.join("model.tar.gz")).unwrap()
    );
    // The uploaded model loads: predicting from its S3 URI gives what the local archive gives.
    let validation = data.join("validation");
    let predict = |model: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_lanner"))
            .args([
                "predict", "--model", model, "--format", "csv", "--device", "cpu",
            ])
            .args(["--endpoint-url", &moto.url])
            .arg(&validation)
            .envs(env)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let from_s3 = predict("s3://lanner/jobs/from-s3/output/model.tar.gz");
    assert_eq!(from_s3, predict(job.join("model.tar.gz").to_str().unwrap()));
    assert!(from_s3.lines().count() > 2, "{from_s3}");
    let missing = Command::new(env!("CARGO_BIN_EXE_lanner"))
        .args([
            "predict",
            "--model",
            "s3://lanner/jobs/nothing-here/model.tar.gz",
        ])
        .args(["--endpoint-url", &moto.url])
        .arg(&validation)
        .envs(env)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert_eq!(
        last_line(&missing.stderr),
        "error: 's3://lanner/jobs/nothing-here/model.tar.gz' holds no objects; pass the S3 URI \
         of a model.tar.gz or of a model folder"
    );

    let described = text(
        &jobs_with(
            &["describe", "from-s3", "--output", "s3://lanner/jobs"],
            &env,
        )
        .stdout,
    );
    assert!(
        described.contains("Model artifacts:   s3://lanner/jobs/from-s3/output/model.tar.gz"),
        "{described}"
    );

    // The same name again: refused, the artifacts exist.
    let again = fit(
        &[
            "--train",
            "s3://lanner/datasets/stripes/train",
            "--output",
            "s3://lanner/jobs",
            "--job-name",
            "from-s3",
            "--endpoint-url",
            &moto.url,
        ],
        &env,
    );
    assert!(!again.status.success());
    assert!(last_line(&again.stderr).starts_with(
        "error: a training job named from-s3 already has artifacts under s3://lanner/jobs/from-s3/"
    ));

    // An S3 prefix with nothing under it fails the job while staging.
    let result = fit(
        &[
            "--train",
            "s3://lanner/datasets/nothing",
            "--output",
            "s3://lanner/jobs",
            "--job-name",
            "empty",
            "--endpoint-url",
            &moto.url,
        ],
        &env,
    );
    assert!(!result.status.success());
    let message = last_line(&result.stderr);
    assert_eq!(
        message,
        "error: training job empty failed: cannot stage the train channel: s3://lanner/datasets/nothing \
         holds no objects; check the URI (a channel names a prefix, e.g. s3://bucket/train/) and \
         that the data was uploaded"
    );
    let record = json(&cache.join("jobs/empty/job.json"));
    assert_eq!(record["TrainingJobStatus"], "Failed");
    assert_eq!(record["SecondaryStatus"], "Failed");
    // A bucket that does not exist.
    let result = fit(
        &[
            "--train",
            "s3://no-such-bucket/train",
            "--output",
            dir.path().join("jobs").to_str().unwrap(),
            "--job-name",
            "nobucket",
            "--endpoint-url",
            &moto.url,
        ],
        &env,
    );
    let message = last_line(&result.stderr);
    assert!(
        message.contains("cannot list s3://no-such-bucket/train: NoSuchBucket"),
        "{message}"
    );
}

#[test]
fn sigterm_stops_the_job_and_keeps_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let output = dir.path().join("jobs");
    let kept = dir.path().join("kept");
    // A long job that keeps its checkpoints in `kept`, outside its job folder.
    let checkpointed_fit = |job_name: &str| {
        let mut command = fit_command(
            &local_job(
                &data,
                &output,
                &[
                    "--job-name",
                    job_name,
                    "--checkpoint-dir",
                    kept.to_str().unwrap(),
                ],
            ),
            &[],
        );
        command.args(["-p", "fine-tune-epochs=20"]);
        command
    };
    let mut child = checkpointed_fit("stopped")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("[stopped] Epoch 2/") {
            break;
        }
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let stopped = child.wait_with_output().unwrap();
    assert!(!stopped.status.success());
    let message = last_line(&stopped.stderr);
    assert!(
        message.starts_with("error: training job stopped was stopped; its checkpoint is kept in "),
        "{message}\n{rest:?}"
    );
    let job = output.join("stopped");
    let record = json(&job.join("job.json"));
    assert_eq!(record["TrainingJobStatus"], "Stopped");
    assert_eq!(record["SecondaryStatus"], "Stopped");
    assert!(
        fs::read_dir(job.join("checkpoints"))
            .unwrap()
            .next()
            .is_some()
    );
    assert!(!job.join("model/lanner.json").exists());
    assert!(
        fs::read_to_string(job.join("output/failure"))
            .unwrap()
            .starts_with("training was stopped")
    );
    assert!(kept.join("checkpoint.json").is_file());

    // The same fit with the same checkpoint folder resumes: no first epoch again.
    let resumed = checkpointed_fit("resumed").output().unwrap();
    let log = text(&resumed.stdout);
    assert!(resumed.status.success(), "{log}\n{}", text(&resumed.stderr));
    assert!(!log.contains("[resumed] Epoch 1/"), "{log}");
    assert!(log.contains("[resumed] Epoch "), "{log}");
    assert_eq!(
        json(&output.join("resumed/job.json"))["TrainingJobStatus"],
        "Completed"
    );
}
