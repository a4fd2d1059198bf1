//! Output files written whole or not at all: written and synced before they get their name,
//! so a full disk, a crash or a kill never leaves a truncated file under it. Where the kernel
//! and the file system offer unnamed files (`O_TMPFILE`: ext4, xfs, btrfs, tmpfs, ...) an
//! output has no name at all until it is whole, so a process killed while writing (a trace
//! of tens of megabytes takes a second) leaves nothing behind; elsewhere it is written under a
//! temporary name beside its own.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The temporary name an output takes before its own (same directory, so the final step is
/// atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// The directory `path` is in: its parent, or `.` for a bare name.
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Why an output cannot be written where its path names.
#[derive(Debug, thiserror::Error)]
pub enum OutputProblem {
    /// `-`, which other tools take for standard output (here standard output carries the
    /// command's report, and the file would silently be one named `-`).
    #[error(
        "'-' is not standard output here (that carries the report): name a file (./- for one called '-')"
    )]
    Dash,
    /// The directory it would be in does not exist.
    #[error("the directory {} does not exist", .0.display())]
    NoDirectory(PathBuf),
    /// Something other than a regular file is there ([`replace_target`]).
    #[error(transparent)]
    NotReplaceable(#[from] NotReplaceable),
    /// It is one of the command's inputs.
    #[error("is the file given as {option}: the output would replace an input of the run")]
    IsAnInput {
        /// The input's option.
        option: &'static str,
    },
    /// No file can be created in its directory.
    #[error("cannot create a file beside {}: {error}", .target.display())]
    Unwritable {
        /// The file it would replace.
        target: PathBuf,
        /// Why the trial file could not be created.
        error: io::Error,
    },
}

/// Why `path` cannot name an output, if it cannot: `-`, or a path in a directory that does not
/// exist.
pub fn unusable(path: &Path) -> Option<OutputProblem> {
    if path.as_os_str() == "-" {
        return Some(OutputProblem::Dash);
    }
    let dir = parent_dir(path);
    (!dir.is_dir()).then(|| OutputProblem::NoDirectory(dir.to_path_buf()))
}

/// How a finished output takes its name.
#[derive(Clone, Copy, Debug)]
enum Naming {
    /// Only while the name is free ([`link_new`]): nothing is overwritten.
    New,
    /// In place of what is there (a rename over it).
    Replace,
}

/// A new unnamed regular file (`O_TMPFILE`) in the directory where `path` is to be, or `None`
/// where there is none to be had: a kernel or file system without unnamed files, or no
/// `/proc` to name one through ([`name_unnamed`]). Any other failure (no such directory, no
/// permission) is met again, and reported, by the named temporary file tried instead.
fn unnamed_beside(path: &Path) -> Option<File> {
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o666)
        .open(parent_dir(path))
        .ok()
}

/// Give the unnamed `file` ([`unnamed_beside`]) the name `path`, which must be free: a link,
/// which fails with `EEXIST` if the name is taken. Through `/proc/self/fd` as open(2) shows
/// for `O_TMPFILE` (linking the descriptor itself, `AT_EMPTY_PATH`, needs
/// `CAP_DAC_READ_SEARCH`).
fn name_unnamed(file: &File, path: &Path) -> io::Result<()> {
    let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        fd.as_str(),
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

/// `write` into `file` (buffered), then sync it.
fn fill(file: File, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<File> {
    let mut out = BufWriter::with_capacity(1 << 16, file);
    write(&mut out)?;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    Ok(file)
}

/// Write the output `path` with `write`, synced, into `unnamed` (an unnamed file beside it,
/// [`unnamed_beside`]) or, without one, under [`temp_path`]; then give it its name as
/// `naming` says. No name but `path`'s outlives the call.
fn write_whole(
    path: &Path,
    naming: Naming,
    unnamed: Option<File>,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_path(path);
    if let Some(file) = unnamed {
        let file = fill(file, write)?;
        return match naming {
            Naming::New => name_unnamed(&file, path),
            Naming::Replace => {
                name_unnamed(&file, &tmp)?;
                let renamed = std::fs::rename(&tmp, path);
                if renamed.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                renamed
            }
        };
    }
    // Only a temporary file this call made is removed (a taken name is somebody else's).
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let result = fill(file, write).and_then(|_| match naming {
        Naming::New => link_new(&tmp, path),
        Naming::Replace => std::fs::rename(&tmp, path),
    });
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Why an output cannot take the place of what is at its path.
#[derive(Debug, thiserror::Error)]
#[error(
    "is {file_type}, not a regular file: an output only replaces a regular file (renaming over {file_type} would \
     put a regular file in its place)"
)]
pub struct NotReplaceable {
    /// What is there ("a FIFO", "a character device", "a directory", ...).
    pub file_type: &'static str,
}

/// The file an output named `path` replaces: `path` itself, or what the symbolic link there
/// points to (the link stays a link, as a shell's `>` writes through it). Refused unless it is
/// nothing yet or a regular file: renaming over a FIFO or a device node, say `/dev/full` as
/// root, would replace the node itself with a regular file, and renaming over a link that
/// points nowhere would replace the link.
pub fn replace_target(path: &Path) -> Result<PathBuf, NotReplaceable> {
    let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(NotReplaceable {
            file_type: vmsa_host::input::file_type_name(m.file_type()),
        }),
        Err(_) if link => Err(NotReplaceable {
            file_type: "a symbolic link to nothing",
        }),
        // `metadata` followed the link, so its target resolves.
        _ if link => Ok(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())),
        _ => Ok(path.to_path_buf()),
    }
}

/// Whether `a` and `b` name the same existing file: the same device and inode, whatever the
/// spelling, symbolic links or hard links between them.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Write the file `path` names ([`replace_target`]) with what `write` puts into the (buffered)
/// writer it is given, replacing the file if it exists; anything but a regular file is
/// refused and left as it is.
pub fn write_replacing(path: &Path, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<()> {
    let target = replace_target(path).map_err(io::Error::other)?;
    write_whole(&target, Naming::Replace, unnamed_beside(&target), write)
}

/// Write `bytes` to `path`, which must not exist ([`link_new`]: nothing is ever overwritten).
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_whole(path, Naming::New, unnamed_beside(path), |w| w.write_all(bytes))
}

/// Give the file `tmp` the name `path`, which must not exist: a hard link, which fails if
/// `path` appeared meanwhile, so nothing is ever overwritten. On a file system without hard
/// links (vfat, some FUSE mounts: `EPERM` or `EOPNOTSUPP`) a rename after checking that the
/// name is free, which only a writer racing this one could defeat. `tmp` is left for the
/// caller to remove.
pub fn link_new(tmp: &Path, path: &Path) -> std::io::Result<()> {
    link_new_with(tmp, path, |a, b| std::fs::hard_link(a, b))
}

fn link_new_with(
    tmp: &Path,
    path: &Path,
    link: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    match link(tmp, path) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(tmp, path)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use super::*;
    use crate::test_support::{names, scratch};

    #[test]
    fn same_file_sees_through_spellings_and_links_but_not_equal_contents() {
        let dir = scratch("same-file");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(&b, b"x").unwrap();
        std::os::unix::fs::symlink(&a, dir.join("sym")).unwrap();
        std::fs::hard_link(&a, dir.join("hard")).unwrap();
        for other in [
            a.clone(),
            dir.join("sym"),
            dir.join("hard"),
            dir.join(".").join("a"),
        ] {
            assert!(same_file(&a, &other), "{}", other.display());
        }
        assert!(!same_file(&a, &b), "equal bytes, another file");
        assert!(!same_file(&a, &dir.join("missing")));
        assert!(
            !same_file(&dir.join("missing"), &dir.join("missing")),
            "nothing is no file"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn without_hard_links_a_free_name_is_taken_by_rename_and_a_taken_one_refused() {
        let dir = scratch("nolinks");
        let no_links = |_: &Path, _: &Path| Err(std::io::Error::from_raw_os_error(libc::EPERM));
        let (tmp, out) = (dir.join("tmp"), dir.join("out"));
        std::fs::write(&tmp, b"new").unwrap();
        link_new_with(&tmp, &out, no_links).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        std::fs::write(&tmp, b"newer").unwrap();
        let e = link_new_with(&tmp, &out, no_links).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&out).unwrap(), b"new", "never overwritten");
        // Any other failure is the link's own.
        let full = |_: &Path, _: &Path| Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let e = link_new_with(&tmp, &dir.join("other"), full).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(!dir.join("other").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// What [`write_replacing`] is given to write `b`.
    fn bytes(b: &[u8]) -> impl FnOnce(&mut dyn Write) -> io::Result<()> + '_ {
        move |w| w.write_all(b)
    }

    /// A trace killed while it was written left its temporary file (tens of megabytes under a
    /// hidden name); now an output has no name at all until it is whole, on a file system with
    /// unnamed files (the tests' temporary directory: tmpfs or ext4).
    #[test]
    fn an_output_has_no_name_in_its_directory_until_it_is_whole() {
        let dir = scratch("unnamed");
        std::fs::write(dir.join("old.json"), b"old").unwrap();
        let seen = std::cell::RefCell::new(Vec::new());
        let watch = |w: &mut dyn Write| {
            w.write_all(&[b'x'; 100_000])?;
            w.flush()?;
            seen.borrow_mut().push(names(&dir));
            w.write_all(b"end")
        };
        write_replacing(&dir.join("old.json"), watch).unwrap();
        write_new(&dir.join("new.json"), b"new").unwrap();
        write_replacing(&dir.join("third.json"), watch).unwrap();
        assert_eq!(*seen.borrow(), [vec!["old.json"], vec!["new.json", "old.json"]]);
        assert_eq!(std::fs::read(dir.join("old.json")).unwrap().len(), 100_003);
        assert!(std::fs::read(dir.join("third.json")).unwrap().ends_with(b"xend"));
        assert_eq!(names(&dir), ["new.json", "old.json", "third.json"]);
        // A write that fails leaves neither a name nor a change.
        let broken = |w: &mut dyn Write| {
            w.write_all(b"half")?;
            Err(io::Error::other("the writer failed"))
        };
        let e = write_replacing(&dir.join("old.json"), broken).unwrap_err();
        assert_eq!(e.to_string(), "the writer failed");
        assert_eq!(std::fs::read(dir.join("old.json")).unwrap().len(), 100_003);
        assert_eq!(names(&dir), ["new.json", "old.json", "third.json"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Where there are no unnamed files the output is written under its temporary name, which
    /// is gone afterwards; and a file that already had that name (somebody else's) is neither
    /// written to nor removed (it was removed before).
    #[test]
    fn without_unnamed_files_the_temporary_name_is_used_and_never_someone_elses() {
        let dir = scratch("named");
        let out = dir.join("out.json");
        let mut during = Vec::new();
        let watch = |w: &mut dyn Write| {
            w.write_all(b"data")?;
            during = names(&dir);
            Ok(())
        };
        write_whole(&out, Naming::Replace, None, watch).unwrap();
        assert_eq!(during, [temp_path(&out).file_name().unwrap()]);
        assert_eq!(names(&dir), ["out.json"]);
        std::fs::write(temp_path(&out), b"theirs").unwrap();
        let e = write_whole(&out, Naming::Replace, None, bytes(b"mine")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(temp_path(&out)).unwrap(), b"theirs");
        assert_eq!(std::fs::read(&out).unwrap(), b"data");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn replaces_or_refuses_and_leaves_no_temporary_file() {
        let dir = scratch("replace");
        let p = dir.join("out.json");
        write_new(&p, b"one").unwrap();
        assert_eq!(
            write_new(&p, b"two").unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_replacing(&p, bytes(b"three")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_output_through_a_symbolic_link_replaces_its_target_and_keeps_the_link() {
        let dir = scratch("output-link");
        std::fs::create_dir(dir.join("data")).unwrap();
        let real = dir.join("data/trace.json");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink("data/trace.json", &link).unwrap();
        write_replacing(&link, bytes(b"new")).unwrap();
        assert!(
            std::fs::symlink_metadata(&link).unwrap().is_symlink(),
            "still a link"
        );
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        assert_eq!(
            std::fs::read_dir(dir.join("data")).unwrap().count(),
            1,
            "no temporary file left"
        );
        let dangling = dir.join("dangling.json");
        std::os::unix::fs::symlink("nowhere/x.json", &dangling).unwrap();
        let e = write_replacing(&dangling, bytes(b"x")).unwrap_err().to_string();
        assert!(e.starts_with("is a symbolic link to nothing"), "{e}");
        assert!(
            std::fs::symlink_metadata(&dangling).unwrap().is_symlink(),
            "the link stays"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_fifo_or_a_directory_is_never_replaced() {
        let dir = scratch("node");
        std::fs::create_dir(dir.join("sub")).unwrap();
        let fifo = dir.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let e = write_replacing(&fifo, bytes(b"x")).unwrap_err().to_string();
        assert!(e.starts_with("is a FIFO, not a regular file"), "{e}");
        assert!(
            std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(),
            "still a FIFO"
        );
        let e = write_replacing(&dir.join("sub"), bytes(b"x"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("is a directory, not a regular file"), "{e}");
        let e = replace_target(Path::new("/dev/null")).unwrap_err().to_string();
        assert!(e.starts_with("is a character device"), "{e}");
        let absent = dir.join("absent");
        assert_eq!(replace_target(&absent).unwrap(), absent);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "no temporary file left"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
