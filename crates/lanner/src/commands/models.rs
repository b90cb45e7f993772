//! `lanner models`: the registry's backbones, with what a user needs to pick one — input size,
//! feature channels, parameter count, the Keras layers `--fine-tune-layer` counts in, and
//! where the ImageNet weights come from.

use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
use clap::Args;
use lanner_models::{MODELS, ModelEntry};

#[derive(Args)]
pub struct ModelsArgs {
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One line of the list.
struct ModelRow {
    entry: &'static ModelEntry,
    /// Trainable backbone parameters, as timm counts them (no BatchNorm running statistics).
    parameters: usize,
    keras_layers: usize,
}

pub fn run(args: ModelsArgs) -> Result<ExitCode> {
    let device = Device::flex();
    let rows: Vec<ModelRow> = MODELS
        .iter()
        .map(|entry| ModelRow {
            entry,
            parameters: entry.init_backbone(&device).parameter_count(),
            keras_layers: entry.keras_layer_map().layer_count(),
        })
        .collect();
    if args.json {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| {
                serde_json::json!({
                    "name": row.entry.name,
                    "timm_name": row.entry.timm_name,
                    "input_size": row.entry.pretrained.input_size,
                    "feature_channels": row.entry.feature_channels(),
                    "parameters": row.parameters,
                    "keras_layers": row.keras_layers,
                    "hub_id": row.entry.pretrained.hub_id,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[ModelRow]) {
    let name_width = rows.iter().map(|r| r.entry.name.len()).max().unwrap_or(0);
    let timm_width = rows
        .iter()
        .map(|r| r.entry.timm_name.len())
        .max()
        .unwrap_or(0);
    println!(
        "Backbones (parameters: trainable ones, as timm counts them, without BatchNorm running \
         statistics; keras layers: the range of --fine-tune-layer)"
    );
    println!(
        "  {:<name_width$}  {:<timm_width$}  {:>5}  {:>8}  {:>10}  {:>12}  imagenet weights",
        "name", "timm name", "input", "features", "parameters", "keras layers"
    );
    for row in rows {
        println!(
            "  {:<name_width$}  {:<timm_width$}  {:>5}  {:>8}  {:>10}  {:>12}  {}",
            row.entry.name,
            row.entry.timm_name,
            row.entry.pretrained.input_size,
            row.entry.feature_channels(),
            thousands(row.parameters),
            row.keras_layers,
            row.entry.pretrained.hub_id.unwrap_or("none"),
        );
    }
}

/// `2971952` as `2,971,952`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
