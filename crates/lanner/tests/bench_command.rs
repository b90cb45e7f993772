//! `lanner bench`: times every step kind of a real (tiny) model and refuses bad settings.

mod common;

use common::{lanner, text};

#[test]
fn times_each_step_kind_as_json_lines() {
    let out = lanner(&[
        "bench",
        "--arch",
        "mobilenet_v3_small_050",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let steps: Vec<&str> = rows.iter().map(|r| r["step"].as_str().unwrap()).collect();
    assert_eq!(
        steps,
        ["frozen", "fine-tune-layer-100", "full", "inference"]
    );
    for row in &rows {
        assert_eq!(row["step_seconds"].as_array().unwrap().len(), 2);
        assert!(row["images_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(row["total_parameters"], rows[0]["total_parameters"]);
    }
    let trainable: Vec<u64> = rows
        .iter()
        .map(|r| r["trainable_parameters"].as_u64().unwrap())
        .collect();
    assert!(trainable[0] < trainable[1] && trainable[1] < trainable[2] && trainable[3] == 0);
}

#[test]
fn a_table_by_default_and_one_sentence_for_bad_settings() {
    let out = lanner(&[
        "bench",
        "--arch",
        "mobilenet_v3_small_050",
        "--image-size",
        "32",
        "--batch-size",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--step",
        "inference",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("images/s") && table.contains("inference"),
        "{table}"
    );

    let out = lanner(&["bench", "--batch-size", "0", "--device", "cpu"]);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        "error: --batch-size and --steps must be at least 1"
    );
    let out = common::lanner_command()
        .args(["bench", "--device", "cpu", "--step", "inference"])
        .env("LANNER_FUSED_LAYERS", "maybe")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        "error: LANNER_FUSED_LAYERS=maybe is neither on nor off; set one, or unset it"
    );
    let out = common::lanner_command()
        .args(["bench", "--device", "cpu", "--step", "inference"])
        .env("LANNER_COPY_STREAM", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        "error: LANNER_COPY_STREAM=1 is neither on nor off; set one, or unset it"
    );
}
