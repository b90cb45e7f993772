//! The jobs a folder holds, found by their records (`<dir>/<job-name>/job.json`).

use std::path::Path;

use anyhow::{Result, bail};

use crate::job_folder::JobFolder;
use crate::job_record::JobRecord;

/// Every job under `dir`, newest first. A folder without a readable record is skipped.
pub fn list(dir: &Path) -> Result<Vec<JobRecord>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => bail!("cannot read the jobs folder '{}': {error}", dir.display()),
    };
    let mut records: Vec<JobRecord> = entries
        .flatten()
        .filter_map(|entry| JobRecord::load(&entry.path().join("job.json")).ok())
        .collect();
    records.sort_by(|a, b| {
        b.creation_time
            .cmp(&a.creation_time)
            .then_with(|| a.training_job_name.cmp(&b.training_job_name))
    });
    Ok(records)
}

/// The job `name` under `dir`: its folder and record.
pub fn find(dir: &Path, name: &str) -> Result<(JobFolder, JobRecord)> {
    let folder = JobFolder::at(dir, name);
    if !folder.record_file().is_file() {
        bail!(
            "there is no training job named {name} in '{}'; `lanner jobs list --output {}` \
             lists the jobs there",
            dir.display(),
            dir.display()
        );
    }
    let record = JobRecord::load(&folder.record_file())?;
    Ok((folder, record))
}
