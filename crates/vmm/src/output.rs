//! Output files written whole or not at all: into a synced temporary file in the same
//! directory first, then moved to their name, so a full disk or a crash never leaves a
//! truncated file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary file an output is written to before it takes `path`'s name (same directory,
/// so the final step is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `bytes` to a new temporary file beside `path`, synced, then `finish(tmp, path)`; the
/// temporary name never outlives the call.
fn through_temp(
    path: &Path,
    bytes: &[u8],
    finish: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| finish(&tmp, path));
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

/// Write `bytes` to the file `path` names ([`replace_target`]), replacing it if it exists
/// (renamed into place); anything but a regular file is refused and left as it is.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = replace_target(path).map_err(std::io::Error::other)?;
    through_temp(&target, bytes, |tmp, path| std::fs::rename(tmp, path))
}

/// Write `bytes` to `path`, which must not exist ([`link_new`]: nothing is ever overwritten).
pub fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    through_temp(path, bytes, link_new)
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

    /// A fresh, empty directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
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
        write_replacing(&p, b"three").unwrap();
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
        let dir = scratch("link");
        std::fs::create_dir(dir.join("data")).unwrap();
        let real = dir.join("data/trace.json");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink("data/trace.json", &link).unwrap();
        write_replacing(&link, b"new").unwrap();
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
        let e = write_replacing(&dangling, b"x").unwrap_err().to_string();
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
        let e = write_replacing(&fifo, b"x").unwrap_err().to_string();
        assert!(e.starts_with("is a FIFO, not a regular file"), "{e}");
        assert!(
            std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(),
            "still a FIFO"
        );
        let e = write_replacing(&dir.join("sub"), b"x").unwrap_err().to_string();
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
