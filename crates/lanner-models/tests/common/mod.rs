//! Reading the timm fixtures that `fixtures/make_timm_fixtures.py` writes.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// The committed fixtures' folder.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A committed fixture file.
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// The float32 tensor `name` of the fixture file `file`.
pub fn read_f32<const D: usize>(file: &str, name: &str, device: &Device) -> Tensor<D> {
    read_f32_at(&fixture(file), name, device)
}

/// The float32 tensor `name` of the safetensors file at `path`.
pub fn read_f32_at<const D: usize>(path: &Path, name: &str, device: &Device) -> Tensor<D> {
    let file = path.display();
    let bytes = std::fs::read(path).expect("fixture file");
    let tensors = SafeTensors::deserialize(&bytes).expect("safetensors fixture");
    let view = tensors.tensor(name).expect("tensor in fixture");
    assert_eq!(view.dtype(), Dtype::F32, "{name} in {file}");
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_data(TensorData::new(values, view.shape().to_vec()), device)
}

/// max |a - b| over all elements.
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar::<f32>()
}
