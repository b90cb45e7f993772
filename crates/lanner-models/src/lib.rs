//! `lanner-models`: the backbones Lanner fine-tunes, faithful to the reference
//! implementations and loadable from the pretrained weights people have.
//!
//! - [`registry`]: one table from a model name to its architecture and pretrained
//!   configuration (input size, interpolation, normalisation, hub id), like timm's.
//! - [`mobilenet_v3`]: MobileNetV3-Large and -Small at any width, as timm builds them, with
//!   timm's tensor names; it ends at the feature map Keras' `include_top=False` returns.
//! - [`xception`]: Xception as timm's `legacy_xception` (the port of the Keras weights), with
//!   timm's tensor names, up to the 2048-channel feature map.
//! - [`head`]: the seed's classifier — global average pooling, dropout, one dense layer.
//! - [`weights`]: timm checkpoints (and torchvision's, for MobileNetV3), safetensors or
//!   PyTorch `.pth` / `.bin`, into a backbone, with errors that name the missing, unexpected
//!   or mis-shaped tensor.
//! - [`hub`]: `--weights imagenet|PATH|none`: the Hugging Face cache (downloads with
//!   `hf-hub` when online) or a local file, or random initialisation.
//! - [`keras_layers`]: the Keras layer order `--fine-tune-layer` counts in, and which Keras
//!   layer holds each of our tensors.
//! - [`folded`]: a backbone's frozen layers as a fast CPU inference network (BatchNorm folded,
//!   channels-last, one image per thread), for phase 1, the frozen part of phase 2 and
//!   inference; [`frozen`] picks it on the CPU and the burn modules elsewhere.
//! - [`batch_norm`]: PyTorch-named BatchNorm with the seed's frozen-statistics mode;
//!   [`sync_batch_norm`]: its batch statistics over every replica of a data-parallel step.
//! - [`precision`]: f32, bf16 or f16 passes over f32 master weights.
//! - [`worker_threads`]: a command's CPU work on rayon's workers, so that its many small
//!   operations split without a thread hand-off each.
//! - Building blocks: [`squeeze_excite`], [`activation`], [`channels`] (timm's rounding),
//!   [`conv`].
//!
//! Modules carry no backend type: burn 0.22 dispatches on the runtime `Device`.

pub mod activation;
pub mod backbone;
pub mod batch_norm;
pub mod channels;
mod composite;
pub mod conv;
mod dense_conv;
mod depthwise_conv;
mod flex_layers;
pub mod folded;
pub mod frozen;
pub mod fused;
pub mod head;
pub mod hub;
pub mod keras_layers;
mod max_pool;
pub mod mobilenet_v3;
pub mod precision;
pub mod registry;
pub mod squeeze_excite;
pub mod sync_batch_norm;
#[cfg(test)]
mod test_values;
pub mod weights;
pub mod worker_threads;
mod written;
pub mod xception;

pub use backbone::Backbone;
pub use batch_norm::{BatchNorm2d, BatchNorm2dConfig};
pub use frozen::FrozenPrefix;
pub use head::{ClassifierHead, ClassifierHeadConfig, global_average_pool};
pub use hub::{HubConfig, HubError, ResolvedWeights, WeightsSpec};
pub use mobilenet_v3::{MobileNetV3, MobileNetV3Config, MobileNetV3Size};
pub use registry::{
    Architecture, Interpolation, MODELS, ModelEntry, Normalization, PretrainedConfig, UnknownModel,
    find,
};
pub use weights::{
    CheckpointFormat, CheckpointSpec, Loaded, MappedNames, OtherNames, ShapeMismatch, WeightsError,
    WeightsMismatch, load_checkpoint, load_pretrained, load_timm_safetensors,
};
pub use xception::{Xception, XceptionConfig};
