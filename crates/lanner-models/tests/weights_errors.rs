//! What a user sees when a checkpoint does not fit: each error names the tensor and shapes.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::fixture;
use lanner_models::{WeightsError, find};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const MODEL: &str = "mobilenetv3_small_050";

/// The small fixture checkpoint, edited by `edit`, written to a temporary file.
fn edited_checkpoint(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let bytes = std::fs::read(fixture(&format!("{MODEL}.weights.safetensors"))).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let path = dir.join("edited.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

fn f16_zeros(name: &str, shape: &[usize]) -> (String, Dtype, Vec<usize>, Vec<u8>) {
    let n: usize = shape.iter().product();
    (name.to_string(), Dtype::F16, shape.to_vec(), vec![0; 2 * n])
}

fn load(path: &Path) -> Result<(), WeightsError> {
    let entry = find(MODEL).unwrap();
    let backbone = entry.init_backbone(&Device::flex());
    entry.load_weights(backbone, path).map(|_| ())
}

fn message(path: &Path) -> String {
    load(path)
        .expect_err("the checkpoint must not load")
        .to_string()
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), |t| {
        t.retain(|(name, ..)| name != "blocks.1.0.conv_pw.weight")
    });
    let message = message(&path);
    assert!(
        message
            .contains("missing tensor `blocks.1.0.conv_pw.weight` (expected shape [40, 8, 1, 1])"),
        "{message}"
    );
    assert!(
        message.contains("does not fit mobilenetv3_small_050"),
        "{message}"
    );
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn mis_shaped_tensor_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), |t| {
        t.retain(|(name, ..)| name != "bn1.weight");
        t.push(f16_zeros("bn1.weight", &[8]));
    });
    let message = message(&path);
    assert!(
        message.contains("tensor `bn1.weight` has shape [8], expected [16]"),
        "{message}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), |t| {
        t.push(f16_zeros("blocks.6.0.conv.weight", &[4, 4, 1, 1]))
    });
    let message = message(&path);
    assert!(
        message.contains("unexpected tensor `blocks.6.0.conv.weight` (shape [4, 4, 1, 1])"),
        "{message}"
    );
}

#[test]
fn many_problems_are_counted_after_the_first_few() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), |t| {
        t.retain(|(name, ..)| !name.starts_with("blocks.4."))
    });
    let message = message(&path);
    assert!(
        message.contains("missing tensor `blocks.4.0.bn1.bias`"),
        "{message}"
    );
    assert!(
        message.contains("more; pass a checkpoint of timm's `mobilenetv3_small_050`"),
        "{message}"
    );
}

#[test]
fn checkpoint_head_and_batch_counters_are_ignored() {
    // The fixture already carries `classifier.*` and `*.num_batches_tracked`; add timm's
    // `conv_head` too.
    let dir = tempfile::tempdir().unwrap();
    let path = edited_checkpoint(dir.path(), |t| {
        assert!(t.iter().any(|(name, ..)| name == "classifier.weight"));
        assert!(
            t.iter()
                .any(|(name, ..)| name.ends_with("num_batches_tracked"))
        );
        t.push(f16_zeros("conv_head.weight", &[1024, 288, 1, 1]));
    });
    load(&path).expect("head tensors are ignored");
}

#[test]
fn absent_file_says_so() {
    let message = message(Path::new("/nonexistent/weights.safetensors"));
    assert_eq!(
        message,
        "weights file `/nonexistent/weights.safetensors` does not exist; pass a .safetensors \
         file, or a .pth / .bin file written by `torch.save(model.state_dict(), path)`"
    );
}

#[test]
fn a_broken_safetensors_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // A header length, the start of a JSON header, then nothing.
    let header = b"{\"a\": {\"dtype\"}  ";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&path, bytes).unwrap();
    let message = message(&path);
    assert!(
        message.starts_with(&format!(
            "cannot read weights file `{}` as safetensors (",
            path.display()
        )),
        "{message}"
    );
}
