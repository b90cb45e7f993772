//! Whether the loader's cache of resized images fits in memory, decided before the first
//! epoch: the cache fills during that epoch, so a data set too large for it would otherwise
//! end the run half-way through, killed for memory, with nothing saved.
//!
//! The memory a process may still use is the smaller of the kernel's estimate
//! (`MemAvailable` in `/proc/meminfo`) and what its control group leaves it (cgroup v2
//! `memory.max − memory.current`, or v1's `limit_in_bytes − usage_in_bytes`): in a container,
//! SageMaker's included, the group's limit is the one that kills. The cache may take at most
//! half of it; the model, the optimizer and the batches in flight need the rest. As
//! Ultralytics does for its `cache=ram`, a cache that would not fit is left off with a
//! warning: the results are the same without it, only slower.

use std::path::{Path, PathBuf};

/// Bytes the cache holds for one image: its resized RGB values as f32, plus the one float of
/// padding the rotation reads past the end.
pub fn cache_bytes_per_image((height, width): (usize, usize)) -> u64 {
    (height as u64 * width as u64 * 3 + 1) * std::mem::size_of::<f32>() as u64
}

/// Why a cache of `images` images of `image_size` should be left off, given `available`
/// bytes of memory: one sentence, or `None` when it fits (or when the memory is unknown).
pub fn cache_warning(
    images: usize,
    image_size: (usize, usize),
    available: Option<u64>,
) -> Option<String> {
    let needed = images as u64 * cache_bytes_per_image(image_size);
    let available = available?;
    (needed > available / 2).then(|| {
        format!(
            "--cache would keep {} of resized images in memory ({images} images at {}x{}), \
             more than half of the {} this process has available, so it is left off: the \
             batches are the same without it, but every epoch decodes the images again (lower \
             --image-size or free memory to cache them)",
            human_bytes(needed),
            image_size.0,
            image_size.1,
            human_bytes(available),
        )
    })
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
fn human_bytes(bytes: u64) -> String {
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
    fn the_cache_is_left_off_when_it_needs_more_than_half_the_memory() {
        // 600 images at 64x64: 49,156 bytes each, 29.5 MB in all.
        assert_eq!(cache_bytes_per_image((64, 64)), 49_156);
        assert_eq!(cache_warning(600, (64, 64), Some(60_000_000)), None);
        let warning = cache_warning(600, (64, 64), Some(58_000_000)).unwrap();
        assert!(
            warning.starts_with(
                "--cache would keep 29.5 MB of resized images in memory (600 images at 64x64), \
                 more than half of the 58.0 MB"
            ),
            "{warning}"
        );
        assert!(warning.contains("left off"), "{warning}");
        // Unknown memory (not Linux): the user's flag stands.
        assert_eq!(cache_warning(1_000_000, (224, 224), None), None);
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
