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

/// `Ok(true)` when `written` failed because the reader of stdout went away (`lanner … | head`):
/// it has what it wanted, so the command ends quietly; any other error stays an error.
pub fn reader_left(written: std::io::Result<()>) -> std::io::Result<bool> {
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        other => other.map(|()| false),
    }
}
