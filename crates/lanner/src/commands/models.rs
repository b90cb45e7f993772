//! `lanner models`: the registry's backbones, with what a user needs to pick one — input size,
//! feature channels, parameter count, the Keras layers `--fine-tune-layer` counts in, and
//! where the ImageNet weights come from.

use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
use clap::Args;
use lanner_models::hub::{self, HubConfig, ResolvedWeights, WeightsSpec};
use lanner_models::{MODELS, ModelEntry};

#[derive(Args)]
pub struct ModelsArgs {
    /// Show one model (Lanner or timm name) instead of the whole list.
    pub model: Option<String>,

    /// With MODEL: load these weights into it to check them — `imagenet` (the Hugging Face
    /// cache, downloaded when online and not cached), a .safetensors/.pth/.bin file, or `none`.
    #[arg(long, value_name = "imagenet|PATH|none", requires = "model")]
    pub weights: Option<WeightsSpec>,

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
    let entries: Vec<&'static ModelEntry> = match &args.model {
        Some(name) => vec![lanner_models::find(name)?],
        None => MODELS.iter().collect(),
    };
    if let (Some(entry), Some(spec)) = (entries.first(), &args.weights) {
        check_weights(entry, spec, &device)?;
    }
    let rows: Vec<ModelRow> = entries
        .into_iter()
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

/// Resolves `spec` for `entry` and loads it, saying what was loaded; any problem is the error.
fn check_weights(entry: &ModelEntry, spec: &WeightsSpec, device: &Device) -> Result<()> {
    let hub = HubConfig::from_env()?;
    let backbone = entry.init_backbone(device);
    match hub::resolve(entry, spec, &hub)? {
        ResolvedWeights::Random => {
            println!("{}: random initialisation (timm's scheme)", entry.name)
        }
        ResolvedWeights::File(path) => {
            entry.load_weights(backbone, &path)?;
            println!("{}: weights loaded from {}", entry.name, path.display());
        }
    }
    Ok(())
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
