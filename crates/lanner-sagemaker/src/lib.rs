//! Lanner's side of Amazon SageMaker training: the container contract a training program
//! honours, and a local-mode runner that plays SageMaker's part on this machine.
//!
//! - [`contract`]: what a SageMaker training container finds (`/opt/ml`, or
//!   `$SAGEMAKER_BASE_DIR`): the three JSON files under `input/config/`
//!   ([`contract::hyperparameters_file`], [`contract::input_config`],
//!   [`contract::resource_config`]), the channel folders under `input/data/`, `model/`,
//!   `output/data/`, `checkpoints/`, and `output/failure` ([`contract::failure`]). `lanner
//!   train` reads it when it runs in a container.
//! - A local training job (`lanner fit`), in the order it happens: [`job_name`] (unique names
//!   as the SageMaker SDK makes them), [`job_folder`] (the `/opt/ml` layout of one job, its
//!   three JSON files), [`staging`] (channels from local folders or S3, through [`s3`]),
//!   [`toolkit_env`] (the `SM_*` variables the SageMaker training toolkit sets),
//!   [`child`] (the training program as a child process, its log streamed and scanned by
//!   [`metrics`]), [`archive`] (`model.tar.gz`, `output.tar.gz`), and [`job_record`]
//!   (`job.json`, shaped like `DescribeTrainingJob`, rewritten atomically as the job moves on).
//!   [`fit`] runs those steps; [`jobs`] finds and reads the jobs a folder holds.

pub mod archive;
pub mod child;
pub mod contract;
pub mod fit;
pub mod job_folder;
pub mod job_name;
pub mod job_record;
pub mod jobs;
pub mod metrics;
pub mod s3;
pub mod staging;
pub mod time;
pub mod toolkit_env;
