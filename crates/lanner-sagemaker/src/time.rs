//! Timestamps as SageMaker shows them: UTC, ISO 8601 with milliseconds in the job record,
//! `YYYY-MM-DD-HH-MM-SS-mmm` in job names.

use chrono::{DateTime, SecondsFormat, Utc};

/// A moment, in UTC.
pub type Timestamp = DateTime<Utc>;

/// Now.
pub fn now() -> Timestamp {
    Utc::now()
}

/// `2024-05-01T12:30:00.123Z`.
pub fn iso(timestamp: &Timestamp) -> String {
    timestamp.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `2024-05-01-12-30-00-123`, the SageMaker SDK's job-name suffix.
pub fn name_suffix(timestamp: &Timestamp) -> String {
    timestamp.format("%Y-%m-%d-%H-%M-%S-%3f").to_string()
}

/// Reads an [`iso`] timestamp back.
pub fn parse_iso(text: &str) -> Option<Timestamp> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn formats_like_sagemaker() {
        let t = Utc.with_ymd_and_hms(2024, 5, 1, 12, 30, 7).unwrap()
            + chrono::Duration::milliseconds(45);
        assert_eq!(iso(&t), "2024-05-01T12:30:07.045Z");
        assert_eq!(name_suffix(&t), "2024-05-01-12-30-07-045");
        assert_eq!(parse_iso(&iso(&t)), Some(t));
    }
}
