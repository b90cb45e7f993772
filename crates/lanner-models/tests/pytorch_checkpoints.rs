//! PyTorch checkpoints (`torch.save`) load like safetensors ones, and torchvision's
//! MobileNetV3 names map to timm's: fixtures from `fixtures/make_pytorch_fixtures.py`.

mod common;

use std::path::Path;

use burn::tensor::{Device, Tensor};
use common::{fixture, max_abs_diff, read_f32_at};
use lanner_models::{Backbone, CheckpointFormat, WeightsError, find, global_average_pool};

const TOLERANCE: f32 = 1e-4;

fn load(model: &str, path: &Path) -> Result<Backbone, WeightsError> {
    let entry = find(model).expect("registered");
    entry.load_weights(entry.init_backbone(&Device::flex()), path)
}

/// max |Δ| of the backbone's features against `io`'s.
fn features_delta(backbone: &Backbone, io: &Path) -> f32 {
    let device = Device::flex();
    let input: Tensor<4> = read_f32_at(io, "input", &device);
    let expected: Tensor<4> = read_f32_at(io, "features", &device);
    max_abs_diff(backbone.forward(input), expected)
}

#[test]
fn formats_are_told_apart_by_content() {
    let detect = |name: &str| CheckpointFormat::detect(&fixture(name)).unwrap();
    assert_eq!(
        detect("mobilenetv3_small_050.weights.safetensors"),
        CheckpointFormat::Safetensors
    );
    assert_eq!(
        detect("mobilenetv3_small_050.checkpoint.pth"),
        CheckpointFormat::PyTorch
    );
    // The extension does not decide: a .bin holding a torch.save zip is PyTorch.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("pytorch_model.bin");
    std::fs::copy(fixture("mobilenetv3_small_050.torchvision.pth"), &bin).unwrap();
    assert_eq!(
        CheckpointFormat::detect(&bin).unwrap(),
        CheckpointFormat::PyTorch
    );
}

/// `{"state_dict": <timm state dict>, "epoch": …, "optimizer": …}` written by `torch.save`,
/// with the same weights as the safetensors fixture: the same outputs as timm's.
#[test]
fn nested_pth_checkpoint_matches_timm() {
    let name = "mobilenetv3_small_050";
    let backbone = load(name, &fixture(&format!("{name}.checkpoint.pth"))).expect("loads");
    let io = fixture(&format!("{name}.io.safetensors"));
    let delta = features_delta(&backbone, &io);
    let device = Device::flex();
    let input: Tensor<4> = read_f32_at(&io, "input", &device);
    let pooled_delta = max_abs_diff(
        global_average_pool(backbone.forward(input)),
        read_f32_at(&io, "pooled", &device),
    );
    println!("{name} from .pth: max |Δ| features {delta:e}, pooled {pooled_delta:e}");
    assert!(delta < TOLERANCE, "features differ by {delta}");
    assert!(pooled_delta < TOLERANCE, "pooled differ by {pooled_delta}");
}

/// The same `.pth` and `.safetensors` weights give bit-identical backbones.
#[test]
fn pth_and_safetensors_load_the_same_weights() {
    let name = "mobilenetv3_small_050";
    let from_pth = load(name, &fixture(&format!("{name}.checkpoint.pth"))).unwrap();
    let from_safetensors = load(name, &fixture(&format!("{name}.weights.safetensors"))).unwrap();
    let input = Tensor::<4>::ones([1, 3, 64, 64], &Device::flex());
    let delta = max_abs_diff(
        from_pth.forward(input.clone()),
        from_safetensors.forward(input),
    );
    assert_eq!(delta, 0.0);
}

/// torchvision's own `MobileNetV3` class with timm's `mobilenetv3_small_050` channels, saved
/// with torchvision's names: loads, and gives torchvision's `features` output (which needs
/// torchvision's BatchNorm epsilon).
#[test]
fn torchvision_names_load_and_match_torchvision() {
    let name = "mobilenetv3_small_050";
    let backbone = load(name, &fixture(&format!("{name}.torchvision.pth"))).expect("loads");
    let delta = features_delta(
        &backbone,
        &fixture(&format!("{name}.torchvision.io.safetensors")),
    );
    println!("{name} with torchvision names: max |Δ| features {delta:e}");
    assert!(delta < TOLERANCE, "features differ by {delta}");
}

#[test]
fn torchvision_checkpoint_of_another_width_names_both_names() {
    // Width-0.5 weights with torchvision's names into the width-1.0 network.
    let path = fixture("mobilenetv3_small_050.torchvision.pth");
    let message = load("mobilenet_v3_small", &path).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "weights file `{}` (with torchvision's tensor names, mapped to timm's) does not fit \
             mobilenetv3_small_100: tensor `blocks.0.0.bn2.bias` (torchvision \
             `features.1.block.2.1.bias`) has shape [8], expected [16]; ",
            path.display()
        )),
        "{message}"
    );
    assert!(
        message.ends_with(
            "; pass a checkpoint of timm's `mobilenetv3_small_100` or torchvision's \
             `mobilenet_v3_small`"
        ),
        "{message}"
    );
}

#[test]
fn torchvision_names_at_a_width_torchvision_lacks_say_so() {
    let path = fixture("mobilenetv3_small_050.torchvision.pth");
    let message = load("mobilenet_v3_small_075", &path)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("(torchvision `features.1.block.2.1.bias`) has shape [8]"),
        "{message}"
    );
    assert!(
        message.ends_with(
            "; pass a checkpoint of timm's `mobilenetv3_small_075` (torchvision has no model of \
             this architecture and width)"
        ),
        "{message}"
    );
}

#[test]
fn a_file_that_is_neither_format_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.pth");
    std::fs::write(&path, b"just some text, not a checkpoint").unwrap();
    let message = load("mobilenet_v3_small_050", &path)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        format!(
            "weights file `{}` is neither safetensors nor a PyTorch checkpoint; pass a \
             .safetensors file, or a .pth / .bin file written by \
             `torch.save(model.state_dict(), path)`",
            path.display()
        )
    );
}

#[test]
fn a_broken_pytorch_file_says_which_format_it_tried() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pth");
    std::fs::write(&path, b"PK\x03\x04 a truncated zip").unwrap();
    let message = load("mobilenet_v3_small_050", &path)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with(&format!(
            "cannot read weights file `{}` as a PyTorch checkpoint (",
            path.display()
        )),
        "{message}"
    );
}

/// Real torchvision `mobilenet_v3_large` / `_small` checkpoints (too large to commit), from
/// `make_pytorch_fixtures.py --out DIR [--pretrained]`.
#[test]
#[ignore = "needs LANNER_TORCHVISION_FIXTURES, written by make_pytorch_fixtures.py --out"]
fn full_size_torchvision_checkpoints_match_torchvision() {
    let dir = std::env::var("LANNER_TORCHVISION_FIXTURES").expect("set");
    let dir = Path::new(&dir);
    let mut checked = 0;
    for name in ["mobilenet_v3_large", "mobilenet_v3_small"] {
        let path = dir.join(format!("{name}.pth"));
        if !path.exists() {
            continue;
        }
        let backbone = load(name, &path).expect("loads");
        let delta = features_delta(&backbone, &dir.join(format!("{name}.io.safetensors")));
        println!("torchvision {name}: max |Δ| features {delta:e}");
        assert!(delta < TOLERANCE, "{name}: features differ by {delta}");
        checked += 1;
    }
    assert!(
        checked > 0,
        "no torchvision checkpoints in {}",
        dir.display()
    );
}
