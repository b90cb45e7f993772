//! The Keras layer index map: which layer of the seed's Keras backbone holds each of our
//! tensors, so that `--fine-tune-layer N` freezes exactly the parameters Keras would.
//!
//! The seed freezes `base_model.layers[:N]`: a Keras layer is frozen when its index is below
//! `N`, and layers without weights (activations, padding, adds) count too. The layer order is
//! data, not code: `keras-layers/<architecture>.tsv` lists every layer with its index, name,
//! type and weights (Keras layout), as tf.keras builds the backbone (see that folder's
//! README). For each architecture, a submodule names the Keras layer and weight that hold the
//! same values as each of our timm tensors; [`KerasLayerMap`] looks that name up in the table.

mod mobilenet_v3;
mod xception;

pub use mobilenet_v3::mobilenet_v3_layer_map;
pub use xception::xception_layer_map;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::LazyLock;

use burn::module::Module;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};

use crate::batch_norm::is_running_statistic;

/// One weight of a Keras layer, e.g. `kernel[3, 3, 16, 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KerasWeight {
    /// Keras' name of the weight within its layer (`kernel`, `bias`, `gamma`, `beta`,
    /// `moving_mean`, `moving_variance`, `depthwise_kernel`, `pointwise_kernel`).
    pub name: String,
    /// Its shape in Keras' layout: convolution kernels HWIO, depthwise kernels `H W C 1`.
    pub shape: Vec<usize>,
}

/// One row of a Keras layer table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KerasLayer {
    /// Position in `model.layers`, the number `--fine-tune-layer` counts in.
    pub index: usize,
    /// Keras' layer name (`expanded_conv_3_squeeze_excite_conv`).
    pub name: String,
    /// Keras' layer class (`Conv2D`, `DepthwiseConv2D`, `BatchNormalization`, `ReLU`, …).
    pub kind: String,
    /// The weights the layer holds; empty for layers without any.
    pub weights: Vec<KerasWeight>,
}

/// The layers of one Keras backbone, in `model.layers` order.
#[derive(Clone, Debug)]
pub struct KerasLayerTable {
    layers: Vec<KerasLayer>,
    by_name: BTreeMap<String, usize>,
}

/// A line of a Keras layer table that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Keras layer table, line {line}: {message}")]
pub struct KerasTableError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

impl KerasLayerTable {
    /// Parse a table: a header line, then `index<TAB>name<TAB>type<TAB>weights` per layer,
    /// where weights are `;`-separated `name[d0, d1, …]` (empty for none). Indices must run
    /// 0, 1, 2, … and names must be unique.
    pub fn parse(text: &str) -> Result<Self, KerasTableError> {
        let mut layers = Vec::new();
        let mut by_name = BTreeMap::new();
        for (number, line) in text.lines().enumerate().skip(1) {
            let error = |message: String| KerasTableError {
                line: number + 1,
                message,
            };
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split('\t').collect();
            let [index, name, kind, weights] = fields[..] else {
                return Err(error(format!(
                    "expected 4 tab-separated fields, found {}",
                    fields.len()
                )));
            };
            let index: usize = index
                .parse()
                .map_err(|_| error(format!("index `{index}` is not a number")))?;
            if index != layers.len() {
                return Err(error(format!("index {index}, expected {}", layers.len())));
            }
            let weights = weights
                .split(';')
                .filter(|w| !w.is_empty())
                .map(|w| {
                    parse_weight(w)
                        .ok_or_else(|| error(format!("weight `{w}` is not `name[d0, d1, …]`")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if by_name.insert(name.to_string(), index).is_some() {
                return Err(error(format!("layer name `{name}` appears twice")));
            }
            layers.push(KerasLayer {
                index,
                name: name.to_string(),
                kind: kind.to_string(),
                weights,
            });
        }
        Ok(Self { layers, by_name })
    }

    /// Every layer, in `model.layers` order.
    pub fn layers(&self) -> &[KerasLayer] {
        &self.layers
    }

    /// Number of layers, weightless ones included: the largest sensible `--fine-tune-layer`.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the table has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer named `name`.
    pub fn layer(&self, name: &str) -> Option<&KerasLayer> {
        self.by_name.get(name).map(|&i| &self.layers[i])
    }
}

fn parse_weight(text: &str) -> Option<KerasWeight> {
    let (name, dims) = text.strip_suffix(']')?.split_once('[')?;
    let shape = dims
        .split(',')
        .map(|d| d.trim().parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some(KerasWeight {
        name: name.to_string(),
        shape,
    })
}

/// The Keras backbones whose layer order `--fine-tune-layer` can count in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KerasBackbone {
    /// `tf.keras.applications.MobileNetV3Large`.
    MobileNetV3Large,
    /// `tf.keras.applications.MobileNetV3Small`.
    MobileNetV3Small,
    /// `tf.keras.applications.Xception`.
    Xception,
}

static MOBILENET_V3_LARGE: LazyLock<KerasLayerTable> =
    LazyLock::new(|| embedded(include_str!("../../keras-layers/mobilenet_v3_large.tsv")));
static MOBILENET_V3_SMALL: LazyLock<KerasLayerTable> =
    LazyLock::new(|| embedded(include_str!("../../keras-layers/mobilenet_v3_small.tsv")));
static XCEPTION: LazyLock<KerasLayerTable> =
    LazyLock::new(|| embedded(include_str!("../../keras-layers/xception.tsv")));

fn embedded(text: &str) -> KerasLayerTable {
    // The tables are compiled in and every one is parsed by the tests.
    KerasLayerTable::parse(text).expect("embedded Keras layer table parses")
}

impl KerasBackbone {
    /// The layer table of this backbone (`keras-layers/<name>.tsv`, compiled in).
    pub fn table(self) -> &'static KerasLayerTable {
        match self {
            KerasBackbone::MobileNetV3Large => &MOBILENET_V3_LARGE,
            KerasBackbone::MobileNetV3Small => &MOBILENET_V3_SMALL,
            KerasBackbone::Xception => &XCEPTION,
        }
    }

    /// `tf.keras.applications`' name of the backbone.
    pub fn keras_name(self) -> &'static str {
        match self {
            KerasBackbone::MobileNetV3Large => "MobileNetV3Large",
            KerasBackbone::MobileNetV3Small => "MobileNetV3Small",
            KerasBackbone::Xception => "Xception",
        }
    }
}

/// Where a timm tensor lives in Keras: the layer (by name) and the weight within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KerasWeightName {
    /// Keras' layer name (`expanded_conv_1_expand_bn`).
    pub layer: String,
    /// Keras' weight name within the layer (`gamma`).
    pub weight: &'static str,
}

impl KerasWeightName {
    /// The Keras weight of a convolution's PyTorch `attribute` in Keras layer `layer`.
    pub fn conv(layer: String, attribute: &str) -> Option<Self> {
        Some(KerasWeightName {
            layer,
            weight: conv_weight_name(attribute)?,
        })
    }

    /// The Keras weight of a BatchNorm's PyTorch `attribute` in Keras layer `layer`.
    pub fn batch_norm(layer: String, attribute: &str) -> Option<Self> {
        Some(KerasWeightName {
            layer,
            weight: batch_norm_weight_name(attribute)?,
        })
    }
}

/// Keras' name of a convolution's PyTorch attribute (`weight` → `kernel`, `bias` → `bias`).
pub fn conv_weight_name(attribute: &str) -> Option<&'static str> {
    match attribute {
        "weight" => Some("kernel"),
        "bias" => Some("bias"),
        _ => None,
    }
}

/// Keras' name of a BatchNorm's PyTorch attribute (`weight` → `gamma`, `bias` → `beta`,
/// `running_mean` → `moving_mean`, `running_var` → `moving_variance`).
pub fn batch_norm_weight_name(attribute: &str) -> Option<&'static str> {
    match attribute {
        "weight" => Some("gamma"),
        "bias" => Some("beta"),
        "running_mean" => Some("moving_mean"),
        "running_var" => Some("moving_variance"),
        _ => None,
    }
}

/// A PyTorch-layout shape in Keras' layout: a convolution kernel `O I H W` becomes `H W I O`,
/// a depthwise kernel `C 1 H W` becomes `H W C 1`; vectors stay as they are.
pub fn keras_layout(pytorch_shape: &[usize], depthwise: bool) -> Vec<usize> {
    match *pytorch_shape {
        [channels, 1, h, w] if depthwise => vec![h, w, channels, 1],
        [o, i, h, w] => vec![h, w, i, o],
        _ => pytorch_shape.to_vec(),
    }
}

/// The Keras layer that holds one of our tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KerasLocation<'a> {
    /// The layer; its `index` is what `--fine-tune-layer` compares with.
    pub layer: &'a KerasLayer,
    /// The weight within the layer.
    pub weight: &'a KerasWeight,
}

/// Why a tensor or a `--fine-tune-layer` value has no place in the Keras layer order.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KerasLayerError {
    /// The architecture does not know the tensor, or names a Keras weight the table lacks.
    #[error(
        "tensor `{tensor}` has no counterpart in Keras' {backbone}{}",
        keras.as_ref().map(|k| format!(" (looked for weight `{}` of layer `{}`)", k.weight, k.layer)).unwrap_or_default()
    )]
    Unmapped {
        /// timm's tensor name.
        tensor: String,
        /// `tf.keras.applications`' name of the backbone.
        backbone: &'static str,
        /// The Keras weight the architecture named, if it named one.
        keras: Option<KerasWeightName>,
    },
    /// `--fine-tune-layer` is beyond the last Keras layer.
    #[error(
        "--fine-tune-layer {value} is out of range: Keras' {backbone} has {layers} layers; pass \
         0 (fine-tune every layer) to {layers} (freeze the whole backbone)"
    )]
    FineTuneLayerOutOfRange {
        /// The value given.
        value: usize,
        /// `tf.keras.applications`' name of the backbone.
        backbone: &'static str,
        /// Number of layers in the backbone.
        layers: usize,
    },
}

/// Maps our tensors (timm names) to the layers of a Keras backbone.
#[derive(Clone, Copy)]
pub struct KerasLayerMap {
    backbone: KerasBackbone,
    keras_weight: fn(&str) -> Option<KerasWeightName>,
}

impl fmt::Debug for KerasLayerMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KerasLayerMap")
            .field("backbone", &self.backbone)
            .finish_non_exhaustive()
    }
}

/// Whether each tensor trains at a `--fine-tune-layer`, with the Keras layer it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FineTuneSplit {
    /// Parameters in Keras layers below the boundary: `(timm name, Keras layer index)`.
    pub frozen: Vec<(String, usize)>,
    /// Parameters in Keras layers at or after the boundary.
    pub trainable: Vec<(String, usize)>,
}

impl KerasLayerMap {
    /// A map for `backbone`, with the architecture's function from a timm tensor name to the
    /// Keras weight that holds the same values.
    pub fn new(backbone: KerasBackbone, keras_weight: fn(&str) -> Option<KerasWeightName>) -> Self {
        Self {
            backbone,
            keras_weight,
        }
    }

    /// The Keras backbone this map counts in.
    pub fn backbone(&self) -> KerasBackbone {
        self.backbone
    }

    /// Number of Keras layers, weightless ones included: `--fine-tune-layer` runs from 0
    /// (everything trains) to this (the whole backbone is frozen).
    pub fn layer_count(&self) -> usize {
        self.backbone.table().len()
    }

    /// The Keras layer and weight holding our tensor `tensor` (timm's name, e.g.
    /// `blocks.1.0.conv_pw.weight`).
    pub fn locate(&self, tensor: &str) -> Result<KerasLocation<'static>, KerasLayerError> {
        let keras = (self.keras_weight)(tensor);
        let table = self.backbone.table();
        let location = keras.as_ref().and_then(|k| {
            let layer = table.layer(&k.layer)?;
            let weight = layer.weights.iter().find(|w| w.name == k.weight)?;
            Some(KerasLocation { layer, weight })
        });
        location.ok_or_else(|| KerasLayerError::Unmapped {
            tensor: tensor.to_string(),
            backbone: self.backbone.keras_name(),
            keras,
        })
    }

    /// The index of the Keras layer holding our tensor `tensor`.
    pub fn layer_index(&self, tensor: &str) -> Result<usize, KerasLayerError> {
        Ok(self.locate(tensor)?.layer.index)
    }

    /// `value` if it is a valid `--fine-tune-layer` for this backbone (at most the number of
    /// layers), the error that says the range otherwise.
    pub fn check_fine_tune_layer(&self, value: usize) -> Result<usize, KerasLayerError> {
        let layers = self.layer_count();
        if value > layers {
            return Err(KerasLayerError::FineTuneLayerOutOfRange {
                value,
                backbone: self.backbone.keras_name(),
                layers,
            });
        }
        Ok(value)
    }

    /// Every tensor of `module` (timm names, BatchNorm running statistics included), in
    /// module order, with the index of the Keras layer that holds it.
    pub fn layer_indices<M: Module>(
        &self,
        module: &M,
    ) -> Result<Vec<(String, usize)>, KerasLayerError> {
        module
            .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
            .into_iter()
            .map(|t| {
                let index = self.layer_index(&t.name)?;
                Ok((t.name, index))
            })
            .collect()
    }

    /// The parameters of `module` that Keras freezes at `--fine-tune-layer fine_tune_layer`
    /// (their layer index is below it) and those it trains. BatchNorm running statistics are
    /// in neither: they are never trained.
    pub fn split<M: Module>(
        &self,
        module: &M,
        fine_tune_layer: usize,
    ) -> Result<FineTuneSplit, KerasLayerError> {
        let fine_tune_layer = self.check_fine_tune_layer(fine_tune_layer)?;
        let (frozen, trainable) = self
            .layer_indices(module)?
            .into_iter()
            .filter(|(name, _)| !is_running_statistic(name))
            .partition(|&(_, index)| index < fine_tune_layer);
        Ok(FineTuneSplit { frozen, trainable })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rows_with_and_without_weights() {
        let table = KerasLayerTable::parse(
            "index\tname\ttype\tweights\n\
             0\tinput_layer\tInputLayer\t\n\
             1\tconv\tConv2D\tkernel[3, 3, 3, 16]\n\
             2\tconv_bn\tBatchNormalization\tgamma[16];beta[16];moving_mean[16];moving_variance[16]\n",
        )
        .unwrap();
        assert_eq!(table.len(), 3);
        assert!(table.layers()[0].weights.is_empty());
        let conv = table.layer("conv").unwrap();
        assert_eq!((conv.index, conv.kind.as_str()), (1, "Conv2D"));
        assert_eq!(
            conv.weights,
            vec![KerasWeight {
                name: "kernel".into(),
                shape: vec![3, 3, 3, 16]
            }]
        );
        let names: Vec<&str> = table
            .layer("conv_bn")
            .unwrap()
            .weights
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(names, ["gamma", "beta", "moving_mean", "moving_variance"]);
    }

    #[test]
    fn rejects_gaps_duplicates_and_bad_weights() {
        let header = "index\tname\ttype\tweights\n";
        let error = |body: &str| {
            KerasLayerTable::parse(&format!("{header}{body}"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error("0\ta\tReLU\t\n2\tb\tReLU\t\n"),
            "Keras layer table, line 3: index 2, expected 1"
        );
        assert_eq!(
            error("0\ta\tReLU\t\n1\ta\tReLU\t\n"),
            "Keras layer table, line 3: layer name `a` appears twice"
        );
        assert_eq!(
            error("0\tconv\tConv2D\tkernel[3, x]\n"),
            "Keras layer table, line 2: weight `kernel[3, x]` is not `name[d0, d1, …]`"
        );
        assert_eq!(
            error("0\tconv\tConv2D\n"),
            "Keras layer table, line 2: expected 4 tab-separated fields, found 3"
        );
    }

    #[test]
    fn embedded_tables_parse_with_their_layer_counts() {
        assert_eq!(KerasBackbone::MobileNetV3Large.table().len(), 187);
        assert_eq!(KerasBackbone::MobileNetV3Small.table().len(), 157);
        assert_eq!(KerasBackbone::Xception.table().len(), 132);
    }

    #[test]
    fn converts_pytorch_layouts_to_keras() {
        assert_eq!(keras_layout(&[16, 3, 3, 3], false), [3, 3, 3, 16]);
        assert_eq!(keras_layout(&[64, 1, 5, 5], true), [5, 5, 64, 1]);
        assert_eq!(keras_layout(&[24, 72, 1, 1], false), [1, 1, 72, 24]);
        assert_eq!(keras_layout(&[24], false), [24]);
    }
}
