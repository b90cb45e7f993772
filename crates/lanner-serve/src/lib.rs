//! `lanner-serve`: a trained model as a service — what the seed's deploy notebook gets from TF
//! Serving on a SageMaker endpoint, in the same binary that trained the model.
//!
//! - [`archive`]: unpacking a `model.tar.gz` without trusting it (no `..`, absolute paths,
//!   links out, special files or size bombs).
//! - [`model_dir`]: from `--model` (a folder, a folder with the model in `1/`, an archive) to
//!   the folder that holds `lanner.json`.
//! - [`preprocess`]: image bytes to the model's input, as training prepared its images.
//! - [`predictor`]: the loaded model; predictions as TF Serving returns them (`[p]` for a
//!   binary sigmoid model, K softmax probabilities otherwise) and per-class probabilities.
//! - [`files`]: `lanner predict`'s file walking and batched prediction.
//! - [`request`]: TF Serving's JSON request (`instances` / `inputs`, `{"b64": …}` or pixels).
//! - [`batcher`]: dynamic batching on one inference thread behind a bounded queue.
//! - [`metrics`]: the Prometheus text of `GET /metrics`.
//! - [`server`]: the HTTP server (SageMaker hosting and TF Serving REST), limits, shutdown.

pub mod archive;
pub mod batcher;
pub mod files;
pub mod metrics;
pub mod model_dir;
pub mod predictor;
pub mod preprocess;
pub mod request;
pub mod server;

pub use model_dir::ModelDir;
pub use predictor::{ModelInfo, Predictor};
pub use server::{ServeConfig, ServeError, serve};
