//! `GET /metrics` in Prometheus' text format: requests by route and status, a latency
//! histogram by route, a histogram of forward-pass batch sizes, images predicted, queue depth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Batch-size buckets.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A Prometheus histogram.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), the last one for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let separator = if labels.is_empty() { "" } else { "," };
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// The server's counters; shared by all requests and the inference thread.
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    batch_sizes: Mutex<Histogram>,
    images: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batch_sizes: Mutex::new(Histogram::new(&BATCH_BUCKETS)),
            images: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// One answered request on `route` (a route pattern, never a raw path).
    pub fn record_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route, status)).or_default() += 1;
        }
        if let Ok(mut latency) = self.latency.lock() {
            latency
                .entry(route)
                .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
                .observe(elapsed.as_secs_f64());
        }
    }

    /// One forward pass of `size` images.
    pub fn record_batch(&self, size: usize) {
        if let Ok(mut batches) = self.batch_sizes.lock() {
            batches.observe(size as f64);
        }
        self.images.fetch_add(size as u64, Ordering::Relaxed);
    }

    /// The text Prometheus scrapes, with the current queue depth and readiness.
    pub fn render(&self, queue_depth: usize, ready: bool) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP lanner_requests_total HTTP requests answered, by route and status code.\n",
        );
        out.push_str("# TYPE lanner_requests_total counter\n");
        if let Ok(requests) = self.requests.lock() {
            for ((route, status), count) in requests.iter() {
                let _ = writeln!(
                    out,
                    "lanner_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        out.push_str(
            "# HELP lanner_request_duration_seconds Time from request to response, by route.\n",
        );
        out.push_str("# TYPE lanner_request_duration_seconds histogram\n");
        if let Ok(latency) = self.latency.lock() {
            for (route, histogram) in latency.iter() {
                histogram.render(
                    &mut out,
                    "lanner_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
        }
        out.push_str("# HELP lanner_batch_size Images per forward pass of the model.\n");
        out.push_str("# TYPE lanner_batch_size histogram\n");
        if let Ok(batches) = self.batch_sizes.lock() {
            batches.render(&mut out, "lanner_batch_size", "");
        }
        out.push_str("# HELP lanner_images_predicted_total Images run through the model.\n");
        out.push_str("# TYPE lanner_images_predicted_total counter\n");
        let _ = writeln!(
            out,
            "lanner_images_predicted_total {}",
            self.images.load(Ordering::Relaxed)
        );
        out.push_str("# HELP lanner_queue_depth Prediction requests waiting for the model.\n");
        out.push_str("# TYPE lanner_queue_depth gauge\n");
        let _ = writeln!(out, "lanner_queue_depth {queue_depth}");
        out.push_str("# HELP lanner_model_ready 1 once the model is loaded.\n");
        out.push_str("# TYPE lanner_model_ready gauge\n");
        let _ = writeln!(out, "lanner_model_ready {}", u8::from(ready));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let metrics = Metrics::default();
        metrics.record_request("/ping", 200, Duration::from_millis(2));
        metrics.record_request("/ping", 200, Duration::from_millis(40));
        metrics.record_request("/invocations", 415, Duration::from_millis(1));
        metrics.record_batch(3);
        metrics.record_batch(1);
        let text = metrics.render(2, true);
        for line in [
            "lanner_requests_total{route=\"/ping\",status=\"200\"} 2",
            "lanner_requests_total{route=\"/invocations\",status=\"415\"} 1",
            "lanner_request_duration_seconds_bucket{route=\"/ping\",le=\"0.0025\"} 1",
            "lanner_request_duration_seconds_bucket{route=\"/ping\",le=\"0.05\"} 2",
            "lanner_request_duration_seconds_bucket{route=\"/ping\",le=\"+Inf\"} 2",
            "lanner_request_duration_seconds_count{route=\"/ping\"} 2",
            "lanner_batch_size_bucket{le=\"1\"} 1",
            "lanner_batch_size_bucket{le=\"2\"} 1",
            "lanner_batch_size_bucket{le=\"4\"} 2",
            "lanner_batch_size_sum 4",
            "lanner_batch_size_count 2",
            "lanner_images_predicted_total 4",
            "lanner_queue_depth 2",
            "lanner_model_ready 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
    }
}
