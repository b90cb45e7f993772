//! One module per subcommand.

pub mod bench;
pub mod data;
pub mod evaluate;
pub mod fit;
pub mod jobs;
pub mod models;
pub mod predict;
pub mod serve;
pub mod train;
