//! `lanner train` and `lanner evaluate` end to end, on images the test draws: a learnable
//! task (horizontal against vertical stripes), the seed's log lines and metrics file, the
//! artifact reloaded, the seed's two phases, resumption after SIGTERM, and bad input.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{first_line_then_close, lanner, stripes, text, wait_for_line};

fn dataset(root: &Path) {
    stripes(&root.join("train"), 96, 1);
    stripes(&root.join("validation"), 24, 2);
}

/// The arguments of a small, fast run from scratch.
fn scratch_args<'a>(data: &'a Path, model: &'a Path) -> Vec<String> {
    [
        "train",
        "--train",
        data.join("train").to_str().unwrap(),
        "--validation",
        data.join("validation").to_str().unwrap(),
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
        "6",
        "--fine-tune-epochs",
        "2",
        "--learning-rate",
        "0.003",
        "--random-rotation",
        "0",
        "--patience",
        "10",
        "--workers",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lanner(&args)
}

/// `lanner evaluate --model MODEL --data DATA EXTRA…`.
fn evaluate(model: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "evaluate",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend(extra);
    lanner(&args)
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn trains_from_scratch_logs_like_keras_and_the_model_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let model = dir.path().join("model");
    let output = dir.path().join("output");
    let mut args = scratch_args(&data, &model);
    args.extend(["--output-data-dir".into(), output.to_str().unwrap().into()]);
    args.extend(["--hyperparameter-from-the-future".into(), "7".into()]);
    let result = run(&args);
    let stdout = text(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        text(&result.stderr)
    );
    assert!(
        text(&result.stderr)
            .contains("warning: ignoring unknown argument `--hyperparameter-from-the-future 7`")
    );

    // The seed's metric definitions read every epoch line.
    let epoch_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" samples - "))
        .collect();
    assert_eq!(epoch_lines.len(), 8, "{stdout}");
    for line in &epoch_lines {
        let value = |key: &str| -> f64 {
            let rest = &line[line.find(key).unwrap() + key.len()..];
            let number: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            number.parse().unwrap()
        };
        assert!((0.0..=1.0).contains(&value("val_accuracy: ")));
        assert!((0.0..=1.0).contains(&value(" accuracy: ")));
    }
    assert!(stdout.contains("Epoch 8/8"));
    assert!(
        !stdout.contains("--precision bf16 would"),
        "no hint where bf16 is refused"
    );

    let history = json_lines(&output.join("metrics.jsonl"));
    assert_eq!(history.len(), 8);
    assert_eq!(history[0]["epoch"], 1);
    assert_eq!(history[0]["phase"], "from_scratch");
    for key in [
        "loss",
        "accuracy",
        "val_loss",
        "val_precision",
        "val_recall",
        "val_auc",
        "data_wait_seconds",
    ] {
        assert!(history[7][key].is_number(), "{key} in {}", history[7]);
    }
    for epoch in &history {
        let share = epoch["data_wait_share"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&share), "{epoch}");
    }
    assert!(
        stdout.contains("% - loss: "),
        "the epoch line says how long the step waited for data"
    );

    let card: serde_json::Value =
        serde_json::from_slice(&fs::read(model.join("lanner.json")).unwrap()).unwrap();
    assert_eq!(card["arch"], "mobilenet_v3_small_050");
    assert_eq!(
        card["class_names"],
        serde_json::json!(["horizontal", "vertical"])
    );
    assert_eq!(card["preprocessing"]["image_size"], 32);
    assert_eq!(card["head"]["outputs"], 1);
    assert_eq!(card["hyperparameters"]["batch_size"], 16);
    assert_eq!(card["hyperparameters"]["init"], "keras");
    assert_eq!(card["hyperparameters"]["precision"], "f32");
    assert_eq!(card["batch_norm_epsilon"], 1e-3, "Keras' start");
    let best = &card["best_epoch"];
    let best_accuracy = best["validation"]["accuracy"].as_f64().unwrap();
    assert!(
        best_accuracy >= 0.9,
        "a learnable task: best val_accuracy {best_accuracy}\n{stdout}"
    );
    assert!(model.join("weights.safetensors").is_file());

    // Reloaded, the model gives the best epoch's validation metrics.
    let evaluated = evaluate(&model, &data.join("validation"), &["--json"]);
    assert!(evaluated.status.success(), "{}", text(&evaluated.stderr));
    let metrics: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    assert_eq!(metrics["accuracy"].as_f64().unwrap(), best_accuracy);
    assert_eq!(metrics["confusion"], best["validation"]["confusion"]);
    let loss_difference =
        (metrics["loss"].as_f64().unwrap() - best["validation"]["loss"].as_f64().unwrap()).abs();
    assert!(loss_difference < 1e-9, "{metrics} vs {best}");

    // A card whose precision this device does not compute in (f16 runs on GPUs only) is
    // evaluated in f32, saying so.
    let copy = dir.path().join("card-in-f16");
    fs::create_dir(&copy).unwrap();
    fs::copy(
        model.join("weights.safetensors"),
        copy.join("weights.safetensors"),
    )
    .unwrap();
    let mut f16_card = card.clone();
    f16_card["hyperparameters"]["precision"] = "f16".into();
    fs::write(copy.join("lanner.json"), f16_card.to_string()).unwrap();
    let evaluated = evaluate(
        &copy,
        &data.join("validation"),
        &["--json", "--device", "cpu"],
    );
    let stderr = text(&evaluated.stderr);
    assert!(evaluated.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "note: the model was trained in f16, which the cpu does not compute in; evaluating \
             in f32"
        ),
        "{stderr}"
    );
    let in_f32: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    assert_eq!(in_f32, metrics);

    // A second run into the same folder is refused, and the model is left as it was.
    let weights_before = fs::read(model.join("weights.safetensors")).unwrap();
    let again = run(&scratch_args(&data, &model));
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already holds a model (lanner.json); pass --overwrite"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        fs::read(model.join("weights.safetensors")).unwrap(),
        weights_before
    );

    // The seed's recipe, starting from that model's backbone: head, then fine-tuning.
    let tuned = dir.path().join("tuned");
    let mut args = scratch_args(&data, &tuned);
    let weights = model.join("weights.safetensors");
    args.retain(|a| a != "--from-scratch");
    let position = args.iter().position(|a| a == "none").unwrap();
    args[position] = weights.to_str().unwrap().to_string();
    let position = args.iter().position(|a| a == "--initial-epochs").unwrap();
    args[position + 1] = "1".into();
    let result = run(&args);
    let stdout = text(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        text(&result.stderr)
    );
    // The backbone keeps the epsilon it was trained with (Keras' start), not timm's default.
    assert!(
        stdout.contains("BatchNorm epsilon 0.001 as in ")
            && stdout.contains("lanner.json (the model these weights come from)"),
        "{stdout}"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&fs::read(tuned.join("lanner.json")).unwrap()).unwrap();
    assert_eq!(card["batch_norm_epsilon"], 1e-3);
    // On a CPU with AMX, a run that did not choose its precision hears of bf16.
    let amx_note = "note: this CPU has Intel AMX; --precision bf16 would run the convolutions'";
    assert_eq!(
        stdout.contains(amx_note),
        lanner_models::frozen::cpu_bf16().is_some(),
        "{stdout}"
    );
    assert!(stdout.contains("Phase 1/2 (head): Adam at learning rate 0.003, up to 1 epochs"));
    assert!(stdout.contains("Phase 2/2 (fine_tune): RMSprop at learning rate 0.00001"));
    assert!(
        stdout.contains("Epoch 1/3") && stdout.contains("Epoch 3/3"),
        "{stdout}"
    );

    // The recipe in bf16: on a CPU with AMX, the convolutions' products and validation run on
    // its tiles, the card says so, and `evaluate` (in the card's precision unless told
    // otherwise) reproduces the best epoch; elsewhere one sentence says what the CPU lacks.
    let tuned_bf16 = dir.path().join("tuned-bf16");
    let position = args
        .iter()
        .position(|a| a == tuned.to_str().unwrap())
        .unwrap();
    args[position] = tuned_bf16.to_str().unwrap().to_string();
    args.extend(["--device", "cpu", "--precision", "bf16"].map(String::from));
    let result = run(&args);
    if lanner_models::frozen::cpu_bf16().is_none() {
        assert!(!result.status.success() && !tuned_bf16.exists());
        let stderr = text(&result.stderr);
        assert!(
            stderr.contains("--precision bf16 on the cpu needs Intel AMX"),
            "{stderr}"
        );
        eprintln!("this CPU has no AMX: checked the refusal only");
        return;
    }
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(!text(&result.stdout).contains(amx_note));
    let card: serde_json::Value =
        serde_json::from_slice(&fs::read(tuned_bf16.join("lanner.json")).unwrap()).unwrap();
    assert_eq!(card["hyperparameters"]["precision"], "bf16");
    let best = &card["best_epoch"]["validation"];
    let mut losses = Vec::new();
    for options in [
        &["--json", "--device", "cpu"][..],
        &["--json", "--device", "cpu", "--precision", "bf16"],
    ] {
        let evaluated = evaluate(&tuned_bf16, &data.join("validation"), options);
        assert!(evaluated.status.success(), "{}", text(&evaluated.stderr));
        let metrics: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
        assert_eq!(metrics["accuracy"], best["accuracy"], "{options:?}");
        assert_eq!(metrics["confusion"], best["confusion"], "{options:?}");
        losses.push(metrics["loss"].as_f64().unwrap());
    }
    assert_eq!(losses[0], losses[1], "the card's precision is the default");
    // In f32 the same weights give a loss that differs in the last digits: not bf16's.
    let evaluated = evaluate(
        &tuned_bf16,
        &data.join("validation"),
        &["--json", "--device", "cpu", "--precision", "f32"],
    );
    assert!(evaluated.status.success(), "{}", text(&evaluated.stderr));
    let metrics: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    let f32_loss = metrics["loss"].as_f64().unwrap();
    assert!(
        f32_loss != losses[0] && (f32_loss - losses[0]).abs() < 0.05,
        "f32 {f32_loss}, bf16 {}",
        losses[0]
    );
}

#[test]
fn undecodable_and_unread_files_are_named_and_a_class_left_without_images_stops_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stripes(&data.join("train"), 12, 1);
    stripes(&data.join("validation"), 6, 2);
    fs::write(
        data.join("train/vertical/broken.jpg"),
        b"\xff\xd8\xff garbage",
    )
    .unwrap();
    fs::write(data.join("validation/horizontal/empty.png"), b"").unwrap();
    fs::write(data.join("train/horizontal/photo.webp"), b"RIFF").unwrap();
    let model = dir.path().join("model");
    let mut args = scratch_args(&data, &model);
    for (option, value) in [("--initial-epochs", "2"), ("--fine-tune-epochs", "0")] {
        let position = args.iter().position(|a| a == option).unwrap();
        args[position + 1] = value.into();
    }
    let result = run(&args);
    let stdout = text(&result.stdout);
    assert!(result.status.success(), "{stdout}{}", text(&result.stderr));
    assert!(
        stdout.contains(&format!(
            "Ignored 1 file in '{}' that is not a .jpg, .jpeg, .png, .bmp or .gif image (webp 1)",
            data.join("train").display()
        )),
        "{stdout}"
    );
    // Each bad file is named once, after the epoch that found it, and left out of the counts.
    let train_skip = format!(
        "Skipped 1 training image that cannot be decoded (--strict stops on them instead):\n  {}: ",
        data.join("train/vertical/broken.jpg").display()
    );
    let validation_skip = format!(
        "Skipped 1 validation image that cannot be decoded (--strict stops on them instead):\n  {}: the file is empty",
        data.join("validation/horizontal/empty.png").display()
    );
    assert!(stdout.contains(&train_skip), "{stdout}");
    assert!(stdout.contains(&validation_skip), "{stdout}");
    assert_eq!(stdout.matches("Skipped ").count(), 2, "{stdout}");
    let epoch_one = stdout.find("Epoch 1/2").unwrap();
    assert!(
        stdout.find("Skipped ").unwrap()
            > stdout[epoch_one..].find(" samples - ").unwrap() + epoch_one
    );
    assert!(stdout.contains("\n24 samples - "), "{stdout}");

    let evaluated = evaluate(&model, &data.join("validation"), &[]);
    assert!(evaluated.status.success());
    assert!(text(&evaluated.stdout).starts_with("12 images - "));
    assert!(
        text(&evaluated.stderr).starts_with("Skipped 1 image that cannot be decoded:\n"),
        "{}",
        text(&evaluated.stderr)
    );

    // A class none of whose training images decodes cannot be learnt: the run stops after the
    // epoch that found out, names the class, and writes no model.
    for entry in fs::read_dir(data.join("train/vertical")).unwrap() {
        fs::write(entry.unwrap().path(), b"not an image").unwrap();
    }
    let unlearnable = dir.path().join("unlearnable");
    let mut args = scratch_args(&data, &unlearnable);
    let position = args.iter().position(|a| a == "--fine-tune-epochs").unwrap();
    args[position + 1] = "0".into();
    let result = run(&args);
    assert_eq!(result.status.code(), Some(1));
    assert_eq!(
        text(&result.stderr).trim_end(),
        "error: no training image of class 'vertical' can be decoded (13 skipped, listed above); \
         replace them, or remove the class folder to train without it"
    );
    assert!(text(&result.stdout).contains("Skipped 13 training images"));
    assert!(!unlearnable.exists());
}

#[test]
fn a_closed_stdout_does_not_stop_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let model = dir.path().join("model");
    let output = dir.path().join("output");
    let mut args = scratch_args(&data, &model);
    args.extend(["--output-data-dir".into(), output.to_str().unwrap().into()]);
    // As `lanner train … | head -1`: the reader goes away after the first line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lanner"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = first_line_then_close(&mut child);
    assert!(
        first.starts_with("Training mobilenet_v3_small_050"),
        "{first}"
    );
    let result = child.wait_with_output().unwrap();
    let stderr = text(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .matches("warning: the training log cannot be written to stdout")
            .count(),
        1,
        "{stderr}"
    );
    assert!(model.join("lanner.json").is_file());
    assert_eq!(json_lines(&output.join("metrics.jsonl")).len(), 8);
}

#[test]
fn a_run_stopped_by_sigterm_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let args = |model: &Path, checkpoints: &Path| {
        let mut args = scratch_args(&data, model);
        args.extend([
            "--checkpoint-dir".into(),
            checkpoints.to_str().unwrap().into(),
        ]);
        args
    };

    let uninterrupted = dir.path().join("uninterrupted");
    let result = run(&args(&uninterrupted, &dir.path().join("c1")));
    assert!(result.status.success(), "{}", text(&result.stderr));

    let resumed = dir.path().join("resumed");
    let checkpoints = dir.path().join("c2");
    // Reading logits 4 steps late, as on a GPU: the stop reads the steps still unread.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lanner"))
        .args(args(&resumed, &checkpoints))
        .env("LANNER_READBACK_EVERY", "4")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = wait_for_line(&mut child, "Epoch 3/");
    std::thread::sleep(std::time::Duration::from_millis(150));
    // SIGTERM, as SageMaker stops a job (not `Child::kill`, which is SIGKILL).
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopped = child.wait_with_output().unwrap();
    reader.join().unwrap();
    assert!(!stopped.status.success());
    let message = text(&stopped.stderr);
    assert!(message.contains("training was stopped"), "{message}");
    assert!(
        message.contains("resumes it (run the same command again)"),
        "{message}"
    );
    assert!(!resumed.join("lanner.json").exists());

    let result = run(&args(&resumed, &checkpoints));
    let stdout = text(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        text(&result.stderr)
    );
    assert!(stdout.contains("Resuming from the checkpoint"), "{stdout}");
    let same = fs::read(resumed.join("weights.safetensors")).unwrap()
        == fs::read(uninterrupted.join("weights.safetensors")).unwrap();
    assert!(same, "the resumed run ends with other weights");
}

/// The trainer may read each step's logits late (a GPU runs ahead of the host in between),
/// and caches the resized images by default: the weights and every reported number are those
/// of reading the logits after every step and of decoding every image every epoch.
#[test]
fn reading_logits_steps_late_or_decoding_every_epoch_changes_no_number() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let train = |name: &str, readback_every: Option<&str>, extra: &[&str]| {
        let model = dir.path().join(name);
        let output = dir.path().join(format!("{name}-output"));
        let mut args = scratch_args(&data, &model);
        let epochs = args.iter().position(|a| a == "--initial-epochs").unwrap();
        args[epochs + 1] = "2".into();
        args.extend(["--output-data-dir".into(), output.to_str().unwrap().into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut command = common::lanner_command();
        command.args(&args).env_remove("LANNER_READBACK_EVERY");
        if let Some(every) = readback_every {
            command.env("LANNER_READBACK_EVERY", every);
        }
        let result = command.output().unwrap();
        assert!(result.status.success(), "{}", text(&result.stderr));
        // 192 + 48 images of 32x32, 12,292 bytes each.
        let caching = "Caching 3.0 MB of resized images (240 at 32x32) in memory after the first \
                       epoch (--no-cache decodes them every epoch instead)";
        assert_eq!(
            text(&result.stdout).contains(caching),
            !extra.contains(&"--no-cache"),
            "{}",
            text(&result.stdout)
        );
        let numbers: Vec<String> = json_lines(&output.join("metrics.jsonl"))
            .iter()
            .map(|epoch| {
                ["loss", "accuracy", "val_loss", "val_accuracy"]
                    .iter()
                    .map(|key| epoch[*key].to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let weights = fs::read(model.join("weights.safetensors")).unwrap();
        (numbers, weights)
    };
    // 6 batches an epoch: read in groups of 4 and 2.
    let (every_step, every_step_weights) = train("every-step", None, &[]);
    let (late, late_weights) = train("late", Some("4"), &[]);
    assert_eq!(every_step.len(), 4);
    assert_eq!(every_step, late);
    assert!(every_step_weights == late_weights, "other weights");
    let (decoded, decoded_weights) = train("decoded", None, &["--no-cache"]);
    assert_eq!(every_step, decoded);
    assert!(every_step_weights == decoded_weights, "other weights");

    let refused = common::lanner_command()
        .args(scratch_args(&data, &dir.path().join("refused")))
        .env("LANNER_READBACK_EVERY", "0")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        common::last_line(&refused.stderr).contains("LANNER_READBACK_EVERY=0 is not a number"),
        "{}",
        text(&refused.stderr)
    );
}

/// Data-parallel training from scratch on three replicas of the CPU (the GPUs' code path:
/// shards, BatchNorm statistics gathered across replicas, gradients summed) reports what one
/// device reports on the same batches, up to float rounding.
///
/// Two epochs at a learning rate of 0.001: training from scratch on batches of 16 amplifies
/// rounding differences (from adding in another order) about tenfold per epoch from the
/// third on, and faster at higher rates, as it would between two GPUs of different models.
#[test]
fn three_cpu_replicas_train_from_scratch_as_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let train = |name: &str, replicas: &str, fused_layers: &str| {
        let model = dir.path().join(name);
        let output = dir.path().join(format!("{name}-output"));
        let mut args = scratch_args(&data, &model);
        for (name, value) in [
            ("--initial-epochs", "2"),
            ("--fine-tune-epochs", "0"),
            ("--learning-rate", "0.001"),
        ] {
            let at = args.iter().position(|a| a == name).unwrap();
            args[at + 1] = value.into();
        }
        args.extend(["--output-data-dir".into(), output.to_str().unwrap().into()]);
        let result = common::lanner_command()
            .args(&args)
            .env("LANNER_REPLICAS", replicas)
            .env("LANNER_FUSED_LAYERS", fused_layers)
            .output()
            .unwrap();
        assert!(result.status.success(), "{}", text(&result.stderr));
        let numbers: Vec<Vec<f64>> = json_lines(&output.join("metrics.jsonl"))
            .iter()
            .map(|epoch| {
                ["loss", "accuracy", "val_loss", "val_accuracy"]
                    .iter()
                    .map(|key| epoch[*key].as_f64().unwrap())
                    .collect()
            })
            .collect();
        (numbers, text(&result.stdout) + &text(&result.stderr))
    };
    // With Lanner's fused layers (the CPU's and the `torch` build's), and with burn's composite
    // layers, which the `cuda` build runs.
    for fused_layers in ["on", "off"] {
        let (one, _) = train(&format!("one-{fused_layers}"), "1", fused_layers);
        let (three, log) = train(&format!("three-{fused_layers}"), "3", fused_layers);
        assert!(log.contains("data-parallel over 3 replicas"), "{log}");
        assert_eq!(one.len(), 2);
        for (one, three) in one.iter().zip(&three) {
            // loss, accuracy (192 images), val_loss, val_accuracy (48 images)
            let tolerances = [1e-3 * one[0], 1.5 / 192.0, 1e-3 * one[2], 1.5 / 48.0];
            for ((a, b), tolerance) in one.iter().zip(three).zip(tolerances) {
                assert!(
                    (a - b).abs() <= tolerance,
                    "fused layers {fused_layers}: {one:?} vs {three:?}"
                );
            }
        }
    }

    let refused = common::lanner_command()
        .args(scratch_args(&data, &dir.path().join("refused")))
        .env("LANNER_REPLICAS", "0")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        common::last_line(&refused.stderr).contains("LANNER_REPLICAS=0 is not a number"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn bad_hyperparameters_and_data_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let model = dir.path().join("model");
    let refused = |change: &[(&str, &str)]| {
        let mut args = scratch_args(&data, &model);
        for (option, value) in change {
            let position = args.iter().position(|a| a == option).unwrap();
            args[position + 1] = value.to_string();
        }
        let result = run(&args);
        assert!(!result.status.success());
        assert!(!model.exists(), "nothing is written");
        let stderr = text(&result.stderr);
        assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
        stderr
    };
    assert_eq!(
        refused(&[("--batch-size", "0")]),
        "error: --batch-size must be at least 1\n"
    );
    // A model or checkpoint folder that cannot be written is found before training, not after.
    let blocker = dir.path().join("a-file");
    fs::write(&blocker, b"").unwrap();
    for (option, what) in [
        ("--model-dir", "the model"),
        ("--checkpoint-dir", "checkpoints"),
    ] {
        let mut args = scratch_args(&data, &model);
        let blocked = blocker.join("x").to_str().unwrap().to_string();
        match args.iter().position(|a| a == option) {
            Some(position) => args[position + 1] = blocked,
            None => args.extend([option.into(), blocked]),
        }
        let result = run(&args);
        assert_eq!(result.status.code(), Some(1));
        assert!(
            !text(&result.stdout).contains(" samples - "),
            "nothing trained"
        );
        assert_eq!(
            text(&result.stderr),
            format!(
                "error: cannot write {what} to '{}': Not a directory (os error 20); pass a \
                 {option} in a folder you may write to\n",
                blocker.join("x").display()
            )
        );
    }
    // A step no machine's memory holds (about 7 TB) is refused instead of being killed.
    let too_big = refused(&[("--image-size", "50000")]);
    assert!(
        too_big.starts_with(
            "error: a training step of mobilenet_v3_small_050 at --batch-size 16 and \
             --image-size 50000 needs about "
        ) && too_big.contains("B of memory in its from_scratch phase, more than the ")
            && too_big.ends_with(
                " available; lower --batch-size or --image-size (the need grows with the batch \
                 times the image's pixels)\n"
            ),
        "{too_big}"
    );
    assert!(
        refused(&[("--learning-rate", "-0.1")])
            .contains("--learning-rate must be a positive number, got -0.1")
    );
    assert!(refused(&[("--arch", "resnet50")]).contains("unknown model `resnet50`; choose one of"));
    assert!(
        refused(&[("--random-rotation", "-1")]).contains("--random-rotation must be 0 or more")
    );
    let single = dir.path().join("single");
    fs::create_dir_all(&single).unwrap();
    fs::rename(data.join("train/vertical"), single.join("vertical")).unwrap();
    let stderr = refused(&[]);
    assert!(
        stderr.contains("has only one class ('horizontal')"),
        "{stderr}"
    );
    fs::rename(single.join("vertical"), data.join("train/vertical")).unwrap();

    let mut args = scratch_args(&data, &model);
    args.retain(|a| a != "--from-scratch");
    args.extend(["--fine-tune-layer".into(), "158".into()]);
    let result = run(&args);
    assert!(text(&result.stderr).contains(
        "--fine-tune-layer 158 is past the last layer: the Keras backbone of \
         mobilenet_v3_small_050 has 157 layers"
    ));
    let refused_with = |extra: &[&str], sentence: &str| {
        let mut args = scratch_args(&data, &model);
        args.extend(extra.iter().map(|a| a.to_string()));
        let result = run(&args);
        assert!(!result.status.success() && !model.exists(), "{extra:?}");
        let stderr = text(&result.stderr);
        assert!(stderr.contains(sentence), "{stderr}");
    };
    refused_with(
        &["--device", "cpu", "--gpus", "2"],
        "--gpus 2 needs GPUs, but training runs on the cpu",
    );
    refused_with(
        &["--device", "cpu", "--precision", "bf16"],
        if lanner_models::frozen::cpu_bf16().is_some() {
            "--precision bf16 on the cpu runs the folded kernels, which keep BatchNorm's \
             statistics frozen, and --from-scratch updates them: leave --precision out, or train \
             on a GPU"
        } else {
            "--precision bf16 on the cpu needs Intel AMX (Xeon Sapphire Rapids or later"
        },
    );
    refused_with(
        &["--init", "glorot"],
        "`glorot` is not an initialisation; use keras or timm",
    );
    let mut args = scratch_args(&data, &model);
    args.extend(["--drop-out-percentage".into(), "1".into()]);
    let result = run(&args);
    assert!(
        text(&result.stderr)
            .contains("--drop-out-percentage must be at least 0 and below 1, got 1")
    );
}
