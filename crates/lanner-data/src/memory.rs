//! Whether the loader keeps its resized images in memory after the first epoch, decided
//! before that epoch starts: the cache fills during it, so a data set too large for it would
//! otherwise end the run half-way through, killed for memory, with nothing saved.
//!
//! Cached or not, the batches are the same, bit for bit; the cache only saves decoding and
//! resizing every image every epoch. So it is on by default when the images are small next to
//! the memory ([`AUTO_LIMIT`]), `--cache` asks for it up to half the memory available, and
//! `--no-cache` turns it off. As Ultralytics does for its `cache=ram`, a cache that would not
//! fit is left off with a warning rather than refused.
//!
//! The memory a process may still use is the smaller of the kernel's estimate
//! (`MemAvailable` in `/proc/meminfo`) and what its control group leaves it (cgroup v2
//! `memory.max − memory.current`, or v1's `limit_in_bytes − usage_in_bytes`): in a container,
//! SageMaker's included, the group's limit is the one that kills.

use std::path::{Path, PathBuf};

/// Bytes the cache holds for one image: its resized RGB values as f32, plus the one float of
/// padding the rotation reads past the end.
pub fn cache_bytes_per_image((height, width): (usize, usize)) -> u64 {
    (height as u64 * width as u64 * 3 + 1) * std::mem::size_of::<f32>() as u64
}

/// What the user asked of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheRequest {
    /// Nothing said: cache when the images are small next to the memory (see [`AUTO_LIMIT`]).
    Auto,
    /// `--cache`: cache unless the images would take more than half the memory available.
    Always,
    /// `--no-cache`: decode every image every epoch.
    Never,
}

/// The most an unasked-for cache may hold: 1 GB (1,660 images at 224x224), and at most a
/// quarter of the memory available.
pub const AUTO_LIMIT: u64 = 1_000_000_000;

/// Whether to cache, and the line that says so (or why not) in the training log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheDecision {
    pub cache: bool,
    pub message: Option<String>,
}

/// Whether `images` images of `image_size` are cached under `request`, given `available`
/// bytes of memory (`None`: unknown, when only the 1 GB limit of `Auto` applies).
pub fn decide_cache(
    request: CacheRequest,
    images: usize,
    (height, width): (usize, usize),
    available: Option<u64>,
) -> CacheDecision {
    let needed = images as u64 * cache_bytes_per_image((height, width));
    let what = format!(
        "{} of resized images ({images} at {height}x{width})",
        human_bytes(needed)
    );
    let of_available = |share: u64| available.is_none_or(|a| needed <= a / share);
    let (cache, message) = match request {
        CacheRequest::Never => (false, None),
        CacheRequest::Always if of_available(2) => (
            true,
            Some(format!("Caching {what} in memory after the first epoch")),
        ),
        CacheRequest::Always => (
            false,
            Some(format!(
                "warning: --cache would keep {what} in memory, more than half of the {} this \
                 process has available, so it is left off: the batches are the same without \
                 it, but every epoch decodes the images again (lower --image-size or free \
                 memory to cache them)",
                human_bytes(available.unwrap_or(0)),
            )),
        ),
        CacheRequest::Auto if needed <= AUTO_LIMIT && of_available(4) => (
            true,
            Some(format!(
                "Caching {what} in memory after the first epoch (--no-cache decodes them \
                 every epoch instead)"
            )),
        ),
        CacheRequest::Auto => (
            false,
            Some(format!(
                "Decoding the images every epoch: caching them would keep {what} in memory, \
                 more than 1 GB or a quarter of the {} available (--cache keeps them up to \
                 half of it)",
                available.map_or_else(|| "memory".to_string(), human_bytes),
            )),
        ),
    };
    CacheDecision { cache, message }
}

/// Bytes of memory this process may still allocate, if the system says.
pub fn available_bytes() -> Option<u64> {
    let read = |path: &Path| std::fs::read_to_string(path).ok();
    let system = read(Path::new("/proc/meminfo")).and_then(|text| mem_available(&text));
    let groups = read(Path::new("/proc/self/cgroup"))
        .map(|text| memory_cgroup_dirs(&text))
        .unwrap_or_default();
    let group = groups
        .iter()
        .filter_map(|dir| {
            cgroup_headroom(
                read(&dir.join("memory.max")),
                read(&dir.join("memory.current")),
            )
            .or_else(|| {
                cgroup_headroom(
                    read(&dir.join("memory.limit_in_bytes")),
                    read(&dir.join("memory.usage_in_bytes")),
                )
            })
        })
        .min();
    match (system, group) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The folders that may hold this process's memory limit, from `/proc/self/cgroup`: its own
/// group (v2 `0::/path`, v1 `N:memory:/path`), then the mount's root, which is the
/// container's group when the container does not see the host's paths.
fn memory_cgroup_dirs(proc_self_cgroup: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let base = if controllers.is_empty() {
            root.to_path_buf()
        } else if controllers.split(',').any(|c| c == "memory") {
            root.join("memory")
        } else {
            continue;
        };
        dirs.push(base.join(path.trim_start_matches('/')));
        dirs.push(base);
    }
    dirs.dedup();
    dirs
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// A control group's limit less its usage, or `None` without a limit (v2 writes `max`; v1 a
/// number near `i64::MAX`).
fn cgroup_headroom(limit: Option<String>, usage: Option<String>) -> Option<u64> {
    let limit: u64 = limit?.trim().parse().ok()?;
    let usage: u64 = usage?.trim().parse().ok()?;
    (limit < 1 << 60).then(|| limit.saturating_sub(usage))
}

/// `33.1 MB`, `12.3 GB`: decimal units, as `df -H` and the training log's other sizes.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_from_meminfo() {
        let text = "MemTotal:       24590012 kB\nMemFree:         1023456 kB\n\
                    MemAvailable:   20123456 kB\nBuffers:          123456 kB\n";
        assert_eq!(mem_available(text), Some(20_123_456 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_cgroup_without_a_limit_leaves_the_system_figure() {
        let some = |s: &str| Some(s.to_string());
        assert_eq!(cgroup_headroom(some("max\n"), some("123\n")), None);
        assert_eq!(
            cgroup_headroom(some("9223372036854771712\n"), some("4096\n")),
            None
        );
        assert_eq!(
            cgroup_headroom(some("4294967296\n"), some("1073741824\n")),
            Some(3 << 30)
        );
        // Usage above the limit (reclaim pending) leaves nothing, not an overflow.
        assert_eq!(cgroup_headroom(some("100\n"), some("200\n")), Some(0));
        assert_eq!(cgroup_headroom(None, some("1\n")), None);
    }

    #[test]
    fn the_cache_is_on_by_default_when_small_and_up_to_half_the_memory_when_asked() {
        use CacheRequest::{Always, Auto, Never};
        // 600 images at 64x64: 49,156 bytes each, 29.5 MB in all.
        assert_eq!(cache_bytes_per_image((64, 64)), 49_156);
        let decide = |request, available| decide_cache(request, 600, (64, 64), available);

        let auto = decide(Auto, Some(120_000_000));
        assert!(auto.cache);
        assert_eq!(
            auto.message.as_deref(),
            Some(
                "Caching 29.5 MB of resized images (600 at 64x64) in memory after the first \
                 epoch (--no-cache decodes them every epoch instead)"
            )
        );
        // Over a quarter of what is available: off by default, on when asked.
        let auto = decide(Auto, Some(110_000_000));
        assert!(!auto.cache);
        assert!(
            auto.message
                .unwrap()
                .starts_with("Decoding the images every epoch: caching them would keep 29.5 MB")
        );
        assert!(decide(Always, Some(60_000_000)).cache);
        // Over half: off even when asked, with a warning.
        let always = decide(Always, Some(58_000_000));
        assert!(!always.cache);
        assert!(
            always.message.as_deref().unwrap().starts_with(
                "warning: --cache would keep 29.5 MB of resized images (600 at 64x64) in \
                 memory, more than half of the 58.0 MB"
            ),
            "{always:?}"
        );
        assert_eq!(
            decide(Never, Some(1 << 40)),
            CacheDecision {
                cache: false,
                message: None
            }
        );

        // Over 1 GB: not by default, even with memory to spare; asked for, it is kept.
        let large = |request| decide_cache(request, 2_000, (224, 224), Some(100 << 30));
        assert!(!large(Auto).cache);
        assert!(large(Always).cache);
        // Unknown memory (not Linux): the 1 GB limit, and the user's flag stands.
        assert!(decide(Auto, None).cache);
        assert!(!decide_cache(Auto, 2_000, (224, 224), None).cache);
        assert!(decide_cache(Always, 1_000_000, (224, 224), None).cache);
    }

    #[test]
    fn finds_the_memory_group_of_cgroup_v1_and_v2() {
        let v1 = "5:devices:/\n4:memory:/process_api/614f\n3:cpuset:/\n";
        assert_eq!(
            memory_cgroup_dirs(v1),
            [
                PathBuf::from("/sys/fs/cgroup/memory/process_api/614f"),
                PathBuf::from("/sys/fs/cgroup/memory"),
            ]
        );
        assert_eq!(
            memory_cgroup_dirs("0::/user.slice/session-1.scope\n"),
            [
                PathBuf::from("/sys/fs/cgroup/user.slice/session-1.scope"),
                PathBuf::from("/sys/fs/cgroup"),
            ]
        );
        assert_eq!(
            memory_cgroup_dirs("0::/\n"),
            [PathBuf::from("/sys/fs/cgroup")]
        );
    }

    #[test]
    fn this_machine_reports_some_memory() {
        if cfg!(target_os = "linux") {
            let bytes = available_bytes().expect("/proc/meminfo has MemAvailable");
            assert!(bytes > 0);
        }
    }
}
