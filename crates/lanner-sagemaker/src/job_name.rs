//! Training job names, unique as the SageMaker SDK makes them: `<base>-<YYYY-MM-DD-HH-MM-SS-mmm>`,
//! the base shortened so the name fits SageMaker's 63 characters.

use thiserror::Error;

use crate::time::{Timestamp, name_suffix};

/// SageMaker's longest job name.
pub const MAX_LEN: usize = 63;

/// The base name when none is given.
pub const DEFAULT_BASE: &str = "lanner-train";

/// A name SageMaker would refuse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "`{0}` is not a valid training job name: use 1 to 63 letters, digits and hyphens, \
     starting and ending with a letter or digit"
)]
pub struct InvalidJobName(pub String);

/// `<base>-<timestamp>`, the base cut so the whole name fits in 63 characters.
pub fn unique(base: &str, at: &Timestamp) -> Result<String, InvalidJobName> {
    let suffix = name_suffix(at);
    let room = MAX_LEN - suffix.len() - 1;
    let short = base
        .get(..base.len().min(room))
        .unwrap_or(base)
        .trim_end_matches('-');
    validate(short).map_err(|_| InvalidJobName(base.to_string()))?;
    Ok(format!("{short}-{suffix}"))
}

/// Checks SageMaker's pattern `^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}`.
pub fn validate(name: &str) -> Result<(), InvalidJobName> {
    let valid = !name.is_empty()
        && name.len() <= MAX_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(InvalidJobName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn at() -> Timestamp {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 30, 7).unwrap() + chrono::Duration::milliseconds(45)
    }

    #[test]
    fn appends_the_sdk_timestamp() {
        assert_eq!(
            unique("lanner-train", &at()).unwrap(),
            "lanner-train-2024-05-01-12-30-07-045"
        );
    }

    #[test]
    fn long_bases_are_cut_to_fit() {
        let name = unique(&"a".repeat(80), &at()).unwrap();
        assert_eq!(name.len(), 63);
        assert_eq!(name, format!("{}-2024-05-01-12-30-07-045", "a".repeat(39)));
        let name = unique(&format!("{}-b", "a".repeat(38)), &at()).unwrap();
        assert!(!name.contains("--"), "{name}");
        assert_eq!(name, format!("{}-2024-05-01-12-30-07-045", "a".repeat(38)));
    }

    #[test]
    fn refuses_what_sagemaker_refuses() {
        validate("my-job-1").unwrap();
        assert!(unique("my_job", &at()).is_err());
        for bad in ["", "-job", "job-", "my_job", "job.1", &"a".repeat(64)] {
            assert!(validate(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate("my_job").unwrap_err().to_string(),
            "`my_job` is not a valid training job name: use 1 to 63 letters, digits and \
             hyphens, starting and ending with a letter or digit"
        );
    }
}
