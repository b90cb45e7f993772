//! `lanner train` inside a SageMaker training container, end to end: the `/opt/ml` layout
//! (here under `SAGEMAKER_BASE_DIR`) with its three JSON files and channel folders, or the
//! training toolkit's `--name value` arguments and `SM_*` variables; `output/failure` on
//! error; several hosts refused; SIGTERM as a spot interruption with the checkpoint kept.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::{lanner_command, last_line, stripes, text, wait_for_line};

/// A small from-scratch recipe, as SageMaker writes hyperparameters: every value a string,
/// strings quoted as the SDK's framework estimators quote them, and the SDK's own entries.
const HYPERPARAMETERS: &str = r#"{
    "arch": "\"mobilenet_v3_small_050\"",
    "weights": "none",
    "from_scratch": "true",
    "image_size": "32",
    "batch_size": "16",
    "initial_epochs": "2",
    "fine_tune_epochs": "1",
    "learning_rate": "0.003",
    "random_rotation": "0",
    "patience": "10",
    "workers": "2",
    "sagemaker_program": "\"train.py\"",
    "sagemaker_submit_directory": "\"s3://bucket/source/sourcedir.tar.gz\"",
    "sagemaker_region": "\"us-east-1\"",
    "model_dir": "\"s3://bucket/model\""
}"#;

const INPUT_DATA_CONFIG: &str = r#"{
    "train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"},
    "validation": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
}"#;

const ONE_HOST: &str = r#"{"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0",
    "current_group_name": "homogeneousCluster", "current_instance_type": "ml.m5.large",
    "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "ml.m5.large", "hosts": ["algo-1"]}]}"#;

/// A SageMaker layout under `base` with images in both channels.
fn layout(base: &Path, hyperparameters: &str, resource_config: &str) -> PathBuf {
    let config = base.join("input/config");
    fs::create_dir_all(&config).unwrap();
    fs::write(config.join("hyperparameters.json"), hyperparameters).unwrap();
    fs::write(config.join("inputdataconfig.json"), INPUT_DATA_CONFIG).unwrap();
    fs::write(config.join("resourceconfig.json"), resource_config).unwrap();
    stripes(&base.join("input/data/train"), 32, 1);
    stripes(&base.join("input/data/validation"), 8, 2);
    base.to_path_buf()
}

/// `lanner train ARGS` in the container whose base folder is `base`.
fn train_in(base: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    lanner_command()
        .arg("train")
        .args(args)
        .env("SAGEMAKER_BASE_DIR", base)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

fn failure(base: &Path) -> String {
    fs::read_to_string(base.join("output/failure")).unwrap_or_default()
}

#[test]
fn the_layout_alone_trains_and_the_toolkit_style_gives_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let files = layout(&dir.path().join("files"), HYPERPARAMETERS, ONE_HOST);
    let result = train_in(&files, &[], &[]);
    let stderr = text(&result.stderr);
    assert!(
        result.status.success(),
        "{}\n{stderr}",
        text(&result.stdout)
    );
    for unknown in [
        "`--sagemaker_program=train.py`",
        "`--sagemaker_region=us-east-1`",
        "`--sagemaker_submit_directory=s3://bucket/source/sourcedir.tar.gz`",
    ] {
        assert!(
            stderr.contains(&format!("warning: ignoring unknown argument {unknown}")),
            "{stderr}"
        );
    }
    assert!(
        stderr.contains("host algo-1 of 1 (algo-1), instance type ml.m5.large"),
        "{stderr}"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&fs::read(files.join("model/lanner.json")).unwrap()).unwrap();
    assert_eq!(card["arch"], "mobilenet_v3_small_050");
    assert_eq!(card["hyperparameters"]["batch_size"], 16);
    assert_eq!(card["hyperparameters"]["from_scratch"], true);
    assert_eq!(card["preprocessing"]["image_size"], 32);
    let metrics = fs::read_to_string(files.join("output/data/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(!files.join("output/failure").exists());

    // The training toolkit's way: hyperparameters as arguments (names as the user wrote them,
    // booleans as Python prints them), folders in SM_* variables.
    let toolkit = layout(&dir.path().join("toolkit"), "{}", ONE_HOST);
    let path = |p: &str| toolkit.join(p).display().to_string();
    let args = [
        "--arch",
        "mobilenet_v3_small_050",
        "--weights",
        "none",
        "--from_scratch",
        "True",
        "--image_size",
        "32",
        "--batch_size",
        "16",
        "--initial_epochs",
        "2",
        "--fine_tune_epochs",
        "1",
        "--learning_rate",
        "0.003",
        "--random_rotation",
        "0",
        "--patience",
        "10",
        "--workers",
        "2",
        "--model_dir",
        "s3://bucket/model",
    ];
    let result = train_in(
        &toolkit,
        &args,
        &[
            ("SM_CHANNEL_TRAIN", path("input/data/train")),
            ("SM_CHANNEL_VALIDATION", path("input/data/validation")),
            ("SM_MODEL_DIR", path("model")),
            ("SM_OUTPUT_DATA_DIR", path("output/data")),
            ("SM_NUM_GPUS", "0".into()),
            ("SM_NUM_CPUS", "2".into()),
        ],
    );
    assert!(
        result.status.success(),
        "{}\n{}",
        text(&result.stdout),
        text(&result.stderr)
    );
    assert!(
        text(&result.stdout).contains("device cpu"),
        "SM_NUM_GPUS=0 picks the CPU"
    );
    assert_eq!(
        fs::read(files.join("model/weights.safetensors")).unwrap(),
        fs::read(toolkit.join("model/weights.safetensors")).unwrap(),
        "the same job in both styles ends with the same weights"
    );
}

#[test]
fn errors_end_in_output_failure_as_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, hyperparameters: &str, resources: &str, expected: &str| {
        let base = layout(&dir.path().join(name), hyperparameters, resources);
        let result = train_in(&base, &[], &[]);
        assert!(!result.status.success(), "{name}");
        let sentence = failure(&base);
        assert!(sentence.contains(expected), "{name}: {sentence}");
        assert_eq!(sentence.lines().count(), 1, "{name}: {sentence}");
        assert_eq!(
            last_line(&result.stderr),
            format!("error: {sentence}"),
            "{name}"
        );
        assert!(!base.join("model/lanner.json").exists());
    };
    check(
        "zero-batch",
        &HYPERPARAMETERS.replace(r#""batch_size": "16""#, r#""batch_size": "0""#),
        ONE_HOST,
        "--batch-size must be at least 1",
    );
    check(
        "bad-number",
        &HYPERPARAMETERS.replace(r#""batch_size": "16""#, r#""batch_size": "sixteen""#),
        ONE_HOST,
        "invalid value 'sixteen' for '--batch-size <BATCH_SIZE>'",
    );
    check(
        "bad-switch",
        &HYPERPARAMETERS.replace(r#""workers": "2""#, r#""cache": "yes""#),
        ONE_HOST,
        "hyperparameter `cache` is a switch: set it to \"true\" or \"false\", not \"yes\"",
    );
    check(
        "bad-json",
        r#"{"batch_size": "16","#,
        ONE_HOST,
        "input/config/hyperparameters.json is not a valid SageMaker hyperparameters file: EOF while parsing",
    );
    check(
        "two-hosts",
        HYPERPARAMETERS,
        r#"{"current_host": "algo-1", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}"#,
        "training on more than one host is not supported yet: set instance_count=1 (this job \
         has 2 hosts: algo-1, algo-2; current host algo-1)",
    );

    // A channel the job configures but whose folder is missing.
    let base = layout(&dir.path().join("no-validation"), HYPERPARAMETERS, ONE_HOST);
    fs::remove_dir_all(base.join("input/data/validation")).unwrap();
    let result = train_in(&base, &[], &[]);
    assert!(!result.status.success());
    assert!(
        failure(&base).starts_with("the validation channel's folder ")
            && failure(&base)
                .ends_with("input/data/validation is missing; SageMaker puts File-mode data there"),
        "{}",
        failure(&base)
    );
}

#[test]
fn sigterm_is_a_spot_interruption_the_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let hyperparameters =
        HYPERPARAMETERS.replace(r#""initial_epochs": "2""#, r#""initial_epochs": "4""#);
    let base = layout(&dir.path().join("spot"), &hyperparameters, ONE_HOST);
    // SageMaker creates the folder when the job has a checkpoint S3 URI.
    fs::create_dir_all(base.join("checkpoints")).unwrap();
    let mut child = lanner_command()
        .arg("train")
        .env("SAGEMAKER_BASE_DIR", &base)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = wait_for_line(&mut child, "Epoch 2/");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopped = child.wait_with_output().unwrap();
    reader.join().unwrap();
    assert!(!stopped.status.success());
    let reason = failure(&base);
    assert!(reason.starts_with("training was stopped"), "{reason}");
    assert!(reason.contains("/checkpoints resumes it"), "{reason}");
    assert!(
        fs::read_dir(base.join("checkpoints"))
            .unwrap()
            .next()
            .is_some()
    );
    assert!(!base.join("model/lanner.json").exists());

    // The restarted job resumes from the checkpoint and completes.
    fs::remove_file(base.join("output/failure")).unwrap();
    let result = train_in(&base, &[], &[]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(text(&result.stdout).contains("Resuming from the checkpoint"));
    assert!(base.join("model/weights.safetensors").is_file());
}
