//! Parameter counts and feature channels against timm's (`fixtures/param_counts.json`).

mod common;

use burn::module::Module;
use burn::store::ModuleSnapshot;
use burn::tensor::Device;
use common::fixture;
use lanner_models::find;

#[test]
fn backbones_have_timms_parameter_counts() {
    let json = std::fs::read_to_string(fixture("param_counts.json")).expect("param_counts.json");
    let counts: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let variants = counts["variants"].as_object().expect("variants");
    assert_eq!(variants.len(), 6);
    let device = Device::flex();
    for (timm_name, expected) in variants {
        let entry = find(timm_name).expect("registered");
        let backbone = entry.init_backbone(&device);
        let parameters = expected["parameters"].as_u64().unwrap() as usize;
        let running_stats = expected["running_stats"].as_u64().unwrap() as usize;
        // burn's num_params also counts BatchNorm running statistics.
        assert_eq!(
            backbone.num_params(),
            parameters + running_stats,
            "{timm_name}: {parameters} parameters + {running_stats} running statistics"
        );
        let tensors = backbone.collect(None, None, true).len();
        assert_eq!(
            tensors as u64,
            expected["tensors"].as_u64().unwrap(),
            "{timm_name}"
        );
        assert_eq!(
            entry.feature_channels() as u64,
            expected["feature_channels"].as_u64().unwrap(),
            "{timm_name}"
        );
    }
}
