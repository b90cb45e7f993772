//! `output/failure`: where a failed training program leaves one sentence saying why, which
//! SageMaker shows as the job's `FailureReason`.

use std::io;

use super::Layout;

/// SageMaker keeps the first 1024 characters of the failure file.
const MAX_CHARS: usize = 1024;

/// Writes `message` (at most 1024 characters) to the layout's failure file.
pub fn write(layout: &Layout, message: &str) -> io::Result<()> {
    let path = layout.failure_file();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let message: String = message.trim().chars().take(MAX_CHARS).collect();
    std::fs::write(path, message)
}

/// The reason a training program left in the layout, if it left one.
pub fn read(layout: &Layout) -> Option<String> {
    let text = std::fs::read_to_string(layout.failure_file()).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_one_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert_eq!(read(&layout), None);
        write(&layout, "--batch-size must be at least 1\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(layout.failure_file()).unwrap(),
            "--batch-size must be at least 1"
        );
        assert_eq!(
            read(&layout).as_deref(),
            Some("--batch-size must be at least 1")
        );
        write(&layout, &"x".repeat(2000)).unwrap();
        assert_eq!(read(&layout).unwrap().len(), 1024);
    }
}
