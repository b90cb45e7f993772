//! One module per subcommand.

pub mod data;
pub mod evaluate;
pub mod fit;
pub mod jobs;
pub mod models;
pub mod train;
