//! Unpacking a `model.tar.gz` (or a plain `.tar`) without trusting it.
//!
//! An archive can carry entries that write outside the folder they are unpacked into (`../x`,
//! `/etc/x`, a link that points out followed by a file written through it), special files,
//! or far more bytes than a model needs. Every entry is checked before anything is written,
//! and the first bad one stops the unpacking with an error that names it:
//!
//! - paths must be relative and free of `..`;
//! - regular files and folders are written; symbolic and hard links only when their target
//!   stays inside the folder (symbolic links are created last, so no entry is ever written
//!   through one); device files, FIFOs and other special entries are refused;
//! - the unpacked bytes may not exceed [`ArchiveLimits::max_total_bytes`], nor the entries
//!   [`ArchiveLimits::max_entries`] (checked against the header before the entry's data is
//!   read, and again while copying).

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use tar::{Archive, EntryType};

/// How much an archive may unpack to.
#[derive(Clone, Copy, Debug)]
pub struct ArchiveLimits {
    /// Bytes of all files together.
    pub max_total_bytes: u64,
    /// Entries of any kind.
    pub max_entries: usize,
}

impl Default for ArchiveLimits {
    /// 8 GiB and 100,000 entries: far above any classifier Lanner trains (Xception's weights
    /// are 80 MB), far below what fills a disk.
    fn default() -> Self {
        Self {
            max_total_bytes: 8 << 30,
            max_entries: 100_000,
        }
    }
}

/// Why an archive was not unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file cannot be opened or is not a tar archive.
    #[error("cannot read the archive '{path}': {reason}; pass a model folder or a model.tar.gz")]
    Unreadable {
        /// The archive.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An entry would be written outside the destination, or is of a kind never unpacked.
    #[error("refusing to unpack '{archive}': entry '{entry}' {reason}")]
    Unsafe {
        /// The archive.
        archive: PathBuf,
        /// The entry's path as the archive names it.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The archive unpacks to more than the limit.
    #[error(
        "refusing to unpack '{archive}': it holds more than {limit} (at entry '{entry}'); a model archive is far smaller, so check that this is the right file"
    )]
    TooLarge {
        /// The archive.
        archive: PathBuf,
        /// The entry that went over.
        entry: String,
        /// The limit, in words.
        limit: String,
    },
    /// Writing failed.
    #[error("cannot unpack '{archive}' into '{destination}': {source}")]
    Io {
        /// The archive.
        archive: PathBuf,
        /// Where it was being unpacked.
        destination: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Whether `path` is a file that looks like a tar archive, gzip-compressed or not.
pub fn is_archive(path: &Path) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let mut head = [0u8; 512];
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(_) => return false,
        }
    }
    is_gzip(&head[..read]) || (read >= 262 && &head[257..262] == b"ustar")
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Unpacks the archive at `archive` (gzip-compressed or plain tar) into `destination`, which
/// must exist. On error, what was already written stays inside `destination` (the caller
/// unpacks into a folder of its own and removes it).
pub fn extract(
    archive: &Path,
    destination: &Path,
    limits: ArchiveLimits,
) -> Result<(), ArchiveError> {
    let unreadable = |reason: String| ArchiveError::Unreadable {
        path: archive.to_path_buf(),
        reason,
    };
    let mut file = BufReader::new(File::open(archive).map_err(|e| unreadable(e.to_string()))?);
    let gzip = is_gzip(io::BufRead::fill_buf(&mut file).map_err(|e| unreadable(e.to_string()))?);
    let reader: Box<dyn Read> = if gzip {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Unpacker {
        archive,
        destination,
        limits,
        written: 0,
        entries: 0,
        symlinks: Vec::new(),
    }
    .run(Archive::new(reader))
}

struct Unpacker<'a> {
    archive: &'a Path,
    destination: &'a Path,
    limits: ArchiveLimits,
    written: u64,
    entries: usize,
    /// (link, target), created once every other entry is written.
    symlinks: Vec<(PathBuf, PathBuf)>,
}

impl Unpacker<'_> {
    fn run(mut self, mut tar: Archive<Box<dyn Read>>) -> Result<(), ArchiveError> {
        let entries = tar
            .entries()
            .map_err(|e| self.unreadable(format!("not a tar archive ({e})")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.unreadable(e.to_string()))?;
            let raw = entry.path_bytes();
            let name = String::from_utf8_lossy(&raw).into_owned();
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(self.too_large(&name, format!("{} entries", self.limits.max_entries)));
            }
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName
            ) || kind == EntryType::GNULongLink
            {
                continue; // metadata the tar reader has already applied
            }
            let relative = self.relative_path(
                &name,
                &entry
                    .path()
                    .map_err(|e| self.unsafe_entry(&name, e.to_string()))?,
            )?;
            let target = self.destination.join(&relative);
            match kind {
                EntryType::Regular | EntryType::Continuous => {
                    let size = entry.header().size().unwrap_or(u64::MAX);
                    self.reserve(&name, size)?;
                    if let Some(parent) = target.parent() {
                        fs::create_dir_all(parent).map_err(|e| self.io(e))?;
                    }
                    let mut out = File::create(&target).map_err(|e| self.io(e))?;
                    // The header's size bounds the copy; `take` makes sure of it.
                    let copied =
                        io::copy(&mut (&mut entry).take(size), &mut out).map_err(|e| self.io(e))?;
                    if copied != size {
                        return Err(self.unreadable(format!(
                            "entry '{name}' is cut short ({copied} of {size} bytes)"
                        )));
                    }
                }
                EntryType::Directory => fs::create_dir_all(&target).map_err(|e| self.io(e))?,
                EntryType::Symlink => {
                    let link = self.link_target(&name, &entry)?;
                    if link.is_absolute() {
                        return Err(self.unsafe_entry(
                            &name,
                            format!(
                                "is a symbolic link to the absolute path '{}'",
                                link.display()
                            ),
                        ));
                    }
                    let parent = relative.parent().unwrap_or(Path::new(""));
                    if normalize(&parent.join(&link)).is_none() {
                        return Err(self.unsafe_entry(
                            &name,
                            format!(
                                "is a symbolic link to '{}', outside the archive",
                                link.display()
                            ),
                        ));
                    }
                    self.symlinks.push((relative, link));
                }
                EntryType::Link => {
                    let link = self.link_target(&name, &entry)?;
                    let inside = (!link.is_absolute()).then(|| normalize(&link)).flatten();
                    let Some(inside) = inside else {
                        return Err(self.unsafe_entry(
                            &name,
                            format!(
                                "is a hard link to '{}', outside the archive",
                                link.display()
                            ),
                        ));
                    };
                    let source = self.destination.join(inside);
                    if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                        return Err(self.unsafe_entry(
                            &name,
                            format!(
                                "is a hard link to '{}', which is not a file unpacked before it",
                                link.display()
                            ),
                        ));
                    }
                    if let Some(parent) = target.parent() {
                        fs::create_dir_all(parent).map_err(|e| self.io(e))?;
                    }
                    fs::hard_link(&source, &target).map_err(|e| self.io(e))?;
                }
                other => {
                    let what = match other {
                        EntryType::Char => "a character device",
                        EntryType::Block => "a block device",
                        EntryType::Fifo => "a FIFO (named pipe)",
                        _ => "a special entry",
                    };
                    return Err(self.unsafe_entry(
                        &name,
                        format!("is {what}; a model archive holds only files and folders"),
                    ));
                }
            }
        }
        self.create_symlinks()
    }

    /// Creates the symbolic links, each checked not to pass through another one: `..` after
    /// a link climbs from wherever the link points, which the lexical check cannot see.
    fn create_symlinks(&mut self) -> Result<(), ArchiveError> {
        let links = std::mem::take(&mut self.symlinks);
        let paths: std::collections::HashSet<&Path> =
            links.iter().map(|(link, _)| link.as_path()).collect();
        for (link, target) in &links {
            let parent = link.parent().unwrap_or(Path::new(""));
            let mut walked = PathBuf::new();
            for component in parent.join(target).components() {
                match component {
                    Component::ParentDir => {
                        walked.pop();
                    }
                    Component::Normal(part) => {
                        walked.push(part);
                        if paths.contains(walked.as_path()) && walked != *link {
                            return Err(self.unsafe_entry(
                                &link.display().to_string(),
                                format!(
                                    "is a symbolic link through another link ('{}')",
                                    walked.display()
                                ),
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        for (link, target) in &links {
            let link = self.destination.join(link);
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).map_err(|e| self.io(e))?;
            }
            symlink(target, &link).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// The entry's path as a relative path inside the destination, or why it is not one.
    fn relative_path(&self, name: &str, path: &Path) -> Result<PathBuf, ArchiveError> {
        let mut relative = PathBuf::new();
        for component in path.components() {
            match component {
                Component::Normal(part) => relative.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(self.unsafe_entry(name, "has a `..` in its path".into()));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.unsafe_entry(name, "has an absolute path".into()));
                }
            }
        }
        Ok(relative)
    }

    fn link_target(
        &self,
        name: &str,
        entry: &tar::Entry<'_, impl Read>,
    ) -> Result<PathBuf, ArchiveError> {
        match entry.link_name() {
            Ok(Some(link)) => Ok(link.into_owned()),
            _ => Err(self.unsafe_entry(name, "is a link without a target".into())),
        }
    }

    /// Counts `size` more bytes against the limit.
    fn reserve(&mut self, name: &str, size: u64) -> Result<(), ArchiveError> {
        self.written = self.written.saturating_add(size);
        if self.written > self.limits.max_total_bytes {
            return Err(self.too_large(name, format!("{} bytes", self.limits.max_total_bytes)));
        }
        Ok(())
    }

    fn unsafe_entry(&self, entry: &str, reason: String) -> ArchiveError {
        ArchiveError::Unsafe {
            archive: self.archive.to_path_buf(),
            entry: entry.to_string(),
            reason,
        }
    }

    fn too_large(&self, entry: &str, limit: String) -> ArchiveError {
        ArchiveError::TooLarge {
            archive: self.archive.to_path_buf(),
            entry: entry.to_string(),
            limit,
        }
    }

    fn unreadable(&self, reason: String) -> ArchiveError {
        ArchiveError::Unreadable {
            path: self.archive.to_path_buf(),
            reason,
        }
    }

    fn io(&self, source: io::Error) -> ArchiveError {
        ArchiveError::Io {
            archive: self.archive.to_path_buf(),
            destination: self.destination.to_path_buf(),
            source,
        }
    }
}

/// `path` with `.` and `..` resolved lexically, or `None` when it climbs above its start.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> io::Result<()> {
    Err(io::Error::other("symbolic links are only unpacked on Unix"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use flate2::Compression;
    use flate2::write::GzEncoder;
    use tar::{Builder, Header};

    /// An entry to put in a crafted archive.
    enum Entry<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        Special(&'a str, EntryType),
        /// A header that claims `size` bytes of zeros (a compressed "bomb").
        Zeros(&'a str, u64),
    }

    /// A header whose name is written byte for byte, as a hostile tool would (the tar crate's
    /// own setters refuse `..` and absolute paths).
    fn header(name: &str, kind: EntryType, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        header
    }

    fn tar_gz(path: &Path, entries: &[Entry]) {
        let mut builder = Builder::new(GzEncoder::new(
            File::create(path).unwrap(),
            Compression::fast(),
        ));
        for entry in entries {
            match *entry {
                Entry::File(name, data) => {
                    let h = header(name, EntryType::Regular, data.len() as u64);
                    builder.append(&h, data).unwrap();
                }
                Entry::Dir(name) => builder
                    .append(&header(name, EntryType::Directory, 0), io::empty())
                    .unwrap(),
                Entry::Symlink(name, target) | Entry::HardLink(name, target) => {
                    let kind = if matches!(entry, Entry::Symlink(..)) {
                        EntryType::Symlink
                    } else {
                        EntryType::Link
                    };
                    let mut h = header(name, kind, 0);
                    h.set_link_name_literal(target).unwrap();
                    h.set_cksum();
                    builder.append(&h, io::empty()).unwrap();
                }
                Entry::Special(name, kind) => {
                    builder.append(&header(name, kind, 0), io::empty()).unwrap()
                }
                Entry::Zeros(name, size) => {
                    let h = header(name, EntryType::Regular, size);
                    builder.append(&h, io::repeat(0).take(size)).unwrap();
                }
            }
        }
        builder.into_inner().unwrap().finish().unwrap();
    }

    /// Every path under `dir`, relative, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(folder) = stack.pop() {
            for entry in fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
                if path.is_dir() && !path.is_symlink() {
                    stack.push(path);
                }
            }
        }
        out.sort();
        out
    }

    /// Unpacks `entries` into `root/dest` (`root` also holds the archive) and returns the
    /// error text; also checks that nothing appeared in `root` beside the archive and `dest`.
    fn refused(entries: &[Entry], limits: ArchiveLimits) -> String {
        let root = tempfile::tempdir().unwrap();
        let archive = root.path().join("model.tar.gz");
        tar_gz(&archive, entries);
        let dest = root.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let error = extract(&archive, &dest, limits).expect_err("the archive must be refused");
        assert_eq!(
            listing(root.path())
                .into_iter()
                .filter(|p| !p.starts_with("dest"))
                .collect::<Vec<_>>(),
            vec!["model.tar.gz"],
            "something was written outside the destination"
        );
        error.to_string()
    }

    #[test]
    fn unpacks_files_folders_and_links_inside() {
        let root = tempfile::tempdir().unwrap();
        let archive = root.path().join("model.tar.gz");
        tar_gz(
            &archive,
            &[
                Entry::Dir("1/"),
                Entry::File("1/lanner.json", b"{}"),
                Entry::File("./1/weights.safetensors", b"weights"),
                Entry::Symlink("1/current", "weights.safetensors"),
                Entry::HardLink("1/copy", "1/weights.safetensors"),
            ],
        );
        assert!(is_archive(&archive));
        let dest = root.path().join("dest");
        fs::create_dir(&dest).unwrap();
        extract(&archive, &dest, ArchiveLimits::default()).unwrap();
        assert_eq!(
            listing(&dest),
            vec![
                "1",
                "1/copy",
                "1/current",
                "1/lanner.json",
                "1/weights.safetensors"
            ]
        );
        assert_eq!(fs::read(dest.join("1/current")).unwrap(), b"weights");
        assert_eq!(fs::read(dest.join("1/copy")).unwrap(), b"weights");
    }

    #[test]
    fn refuses_a_parent_folder_entry() {
        let error = refused(
            &[Entry::File("../evil.txt", b"x")],
            ArchiveLimits::default(),
        );
        assert!(
            error.contains("entry '../evil.txt' has a `..` in its path"),
            "{error}"
        );
        let error = refused(
            &[Entry::File("1/../../evil.txt", b"x")],
            ArchiveLimits::default(),
        );
        assert!(error.contains("has a `..` in its path"), "{error}");
    }

    #[test]
    fn refuses_an_absolute_path() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("absolute.txt");
        let name = outside.to_str().unwrap().to_string();
        let error = refused(&[Entry::File(&name, b"x")], ArchiveLimits::default());
        assert!(error.contains("has an absolute path"), "{error}");
        assert!(!outside.exists());
    }

    #[test]
    fn refuses_a_symlink_to_outside() {
        for target in ["../../outside", "sub/../../../outside", "/etc/passwd"] {
            let error = refused(
                &[
                    Entry::Dir("1/"),
                    Entry::Symlink("1/link", target),
                    Entry::File("1/link/x", b"x"),
                ],
                ArchiveLimits::default(),
            );
            assert!(
                error.contains("entry '1/link' is a symbolic link to"),
                "{error}"
            );
        }
    }

    #[test]
    fn writes_nothing_through_a_symlink() {
        // A link that stays inside, then a file written through it: links are created last,
        // so the file lands in a real folder named like the link, never through it.
        let error = refused(
            &[Entry::Symlink("link", "."), Entry::File("link/file", b"x")],
            ArchiveLimits::default(),
        );
        assert!(error.contains("cannot unpack"), "{error}");
        // `up` points at the top, `out` at the top's parent through it.
        let error = refused(
            &[Entry::Symlink("up", "."), Entry::Symlink("out", "up/..")],
            ArchiveLimits::default(),
        );
        assert!(
            error.contains("entry 'out' is a symbolic link through another link ('up')"),
            "{error}"
        );
    }

    #[test]
    fn refuses_a_hard_link_to_outside() {
        for target in ["../../etc/passwd", "/etc/passwd"] {
            let error = refused(
                &[Entry::HardLink("passwd", target)],
                ArchiveLimits::default(),
            );
            assert!(
                error.contains("entry 'passwd' is a hard link to"),
                "{error}"
            );
            assert!(error.contains("outside the archive"), "{error}");
        }
    }

    #[test]
    fn refuses_devices_and_fifos() {
        for (kind, words) in [
            (EntryType::Char, "a character device"),
            (EntryType::Block, "a block device"),
            (EntryType::Fifo, "a FIFO (named pipe)"),
        ] {
            let error = refused(&[Entry::Special("dev", kind)], ArchiveLimits::default());
            assert!(
                error.contains(&format!("entry 'dev' is {words}")),
                "{error}"
            );
        }
    }

    #[test]
    fn refuses_a_size_bomb_before_writing_it() {
        let limits = ArchiveLimits {
            max_total_bytes: 1 << 20,
            max_entries: 10,
        };
        // 64 MiB of zeros compress to a few dozen KiB.
        let error = refused(
            &[Entry::File("a", b"ok"), Entry::Zeros("bomb", 64 << 20)],
            limits,
        );
        assert!(
            error.contains("it holds more than 1048576 bytes (at entry 'bomb')"),
            "{error}"
        );
        let many: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
        let entries: Vec<Entry> = many.iter().map(|n| Entry::File(n, b"")).collect();
        let error = refused(&entries, limits);
        assert!(error.contains("more than 10 entries"), "{error}");
    }

    #[test]
    fn a_file_that_is_no_archive_is_named() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("model.tar.gz");
        fs::write(&path, b"\x1f\x8bnot really gzip").unwrap();
        let error = extract(&path, root.path(), ArchiveLimits::default()).unwrap_err();
        assert!(
            error.to_string().starts_with("cannot read the archive"),
            "{error}"
        );
        fs::write(&path, b"plain text").unwrap();
        assert!(!is_archive(&path));
    }
}
