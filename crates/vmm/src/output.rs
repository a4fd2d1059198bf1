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

/// What [`unnamed_beside`] got: the unnamed file, or why there is none.
#[derive(Debug)]
enum Unnamed {
    /// The new unnamed file.
    File(File),
    /// None to be had: a kernel or file system without unnamed files (`EISDIR`,
    /// `EOPNOTSUPP`), or no `/proc` to name one through ([`name_unnamed`]).
    Unsupported,
    /// `open(O_TMPFILE)` failed otherwise (no such directory, no permission, too many open
    /// files, ...). The named temporary file is tried all the same; if that fails too, its
    /// error carries this one ([`WriteError::unnamed`]), which is often the cause of both.
    Failed(io::Error),
}

/// A new unnamed regular file (`O_TMPFILE`) in the directory where `path` is to be, or why
/// there is none ([`Unnamed`]).
fn unnamed_beside(path: &Path) -> Unnamed {
    if !Path::new("/proc/self/fd").is_dir() {
        return Unnamed::Unsupported;
    }
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o666)
        .open(parent_dir(path))
    {
        Ok(file) => Unnamed::File(file),
        // open(2): EISDIR where the kernel has no O_TMPFILE, EOPNOTSUPP where the file system.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR | libc::EOPNOTSUPP)) => Unnamed::Unsupported,
        Err(e) => Unnamed::Failed(e),
    }
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

/// A call writing an output makes, named when it fails ([`WriteError`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `open(O_CREAT | O_EXCL)` of the temporary name an output is written under where there
    /// are no unnamed files.
    CreateTemporary,
    /// Writing the output's bytes (the writer's own failure, or `write(2)`).
    Write,
    /// `fchmod(2)`: giving a replacement the permission bits of the file it replaces.
    Chmod,
    /// `fsync(2)` of the written file.
    Sync,
    /// `linkat(2)` of an unnamed (`O_TMPFILE`) file to a name.
    LinkUnnamed,
    /// `link(2)` of the temporary name to the output's (never over a file, [`link_new`]).
    Link,
    /// `rename(2)` of the temporary name (a file's or a directory's) over the output's.
    Rename,
    /// `mkdir(2)` of a temporary directory.
    CreateDirectory,
    /// `open(2)` and `fsync(2)` of a directory, which makes the names in it durable.
    SyncDirectory,
    /// `open(2)` and `fsync(2)` of the directory an output was just given its name in (its
    /// parent), without which a crash may lose the name; [`WriteError::path`] is the output's.
    SyncParent,
}

/// A failed call while writing an output: which call, on which path, and its error. Nothing
/// is left under the output's name (nor under a temporary one this process made), but for
/// [`Call::SyncParent`] of a replacement, which has already taken the replaced file's place.
#[derive(Debug)]
pub struct WriteError {
    /// The call that failed.
    pub call: Call,
    /// The path it acted on: the output's (for a link or a rename the name it was to give).
    pub path: PathBuf,
    /// For [`Call::Link`] and [`Call::Rename`]: the temporary name linked or renamed.
    pub from: Option<PathBuf>,
    /// The call's error.
    pub source: io::Error,
    /// For [`Call::CreateTemporary`]: the error of the unnamed (`O_TMPFILE`) file tried first,
    /// where that failed other than for want of support (say `EMFILE`, which the temporary
    /// file then meets too); shown first, so the cause is never hidden.
    pub unnamed: Option<io::Error>,
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl WriteError {
    /// The failed `call` on `path`.
    pub fn new(call: Call, path: &Path, source: io::Error) -> Self {
        Self {
            call,
            path: path.to_path_buf(),
            from: None,
            source,
            unnamed: None,
        }
    }

    /// The failed `call` that was to give `from` the name `path` (a link or a rename).
    pub fn naming(call: Call, from: &Path, path: &Path, source: io::Error) -> Self {
        Self {
            from: Some(from.to_path_buf()),
            ..Self::new(call, path, source)
        }
    }

    /// The kind of the call's error.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        let from = self.from.as_deref().unwrap_or(Path::new("?")).display();
        if let Some(e) = &self.unnamed {
            let dir = parent_dir(&self.path).display();
            write!(
                f,
                "creating an unnamed file in {dir} (open O_TMPFILE) failed: {e}; then "
            )?;
        }
        match self.call {
            Call::CreateTemporary => write!(f, "creating the temporary file {path} (open O_EXCL)"),
            Call::Write => write!(f, "writing {path}"),
            Call::Chmod => write!(f, "giving {path} the replaced file's permission bits (fchmod)"),
            Call::Sync => write!(f, "syncing {path} (fsync)"),
            Call::LinkUnnamed => write!(f, "linking the unnamed (O_TMPFILE) file to {path} (linkat)"),
            Call::Link => write!(f, "linking {from} to {path} (link)"),
            Call::Rename => write!(f, "renaming {from} to {path} (rename)"),
            Call::CreateDirectory => write!(f, "creating the directory {path} (mkdir)"),
            Call::SyncDirectory => write!(f, "syncing the directory {path} (fsync)"),
            Call::SyncParent => write!(
                f,
                "syncing the directory {} after naming {path} in it (fsync)",
                parent_dir(&self.path).display()
            ),
        }?;
        write!(f, " failed: {}", self.source)
    }
}

/// An output written whole and synced that has no name yet ([`pending`]): either an unnamed
/// file or one under its temporary name. [`Pending::name_new`] gives it its name; dropped
/// unnamed, it leaves nothing behind.
#[derive(Debug)]
pub struct Pending {
    /// The name it is to take.
    path: PathBuf,
    /// The file, whole and synced.
    file: File,
    /// The temporary name it has, which this process made (removed on drop).
    temp: Option<PathBuf>,
}

impl Pending {
    /// Give the output its name, which must be free ([`link_new`]: nothing is overwritten).
    pub fn name_new(self) -> Result<(), WriteError> {
        match self.temp.clone() {
            None => name_unnamed(&self.file, &self.path)
                .map_err(|e| WriteError::new(Call::LinkUnnamed, &self.path, e)),
            // The temporary name goes on drop.
            Some(tmp) => {
                link_new(&tmp, &self.path).map_err(|e| WriteError::naming(Call::Link, &tmp, &self.path, e))
            }
        }
    }

    /// Give the output its name in place of what is there (a rename over it).
    fn name_replacing(mut self) -> Result<(), WriteError> {
        let tmp = match self.temp.clone() {
            Some(tmp) => tmp,
            None => {
                let tmp = temp_path(&self.path);
                // A taken temporary name is somebody else's: not this one's to remove.
                name_unnamed(&self.file, &tmp).map_err(|e| WriteError::new(Call::LinkUnnamed, &tmp, e))?;
                self.temp = Some(tmp.clone());
                tmp
            }
        };
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| WriteError::naming(Call::Rename, &tmp, &self.path, e))?;
        self.temp = None;
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(tmp) = &self.temp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Write the output `path` with `write` (buffered), whole and synced, with `mode` as its
/// permission bits if given, into `unnamed` (an unnamed file beside it, [`unnamed_beside`])
/// or, without one, under [`temp_path`]: everything but its name.
fn prepare(
    path: &Path,
    unnamed: Unnamed,
    mode: Option<u32>,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Pending, WriteError> {
    let (file, temp) = match unnamed {
        Unnamed::File(file) => (file, None),
        Unnamed::Unsupported | Unnamed::Failed(_) => {
            // Only a temporary file this call made is removed (a taken name is somebody else's).
            let tmp = temp_path(path);
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| WriteError {
                    unnamed: match unnamed {
                        Unnamed::Failed(e) => Some(e),
                        _ => None,
                    },
                    ..WriteError::new(Call::CreateTemporary, &tmp, e)
                })?;
            (file, Some(tmp))
        }
    };
    let pending = Pending {
        path: path.to_path_buf(),
        file,
        temp,
    };
    let fail = |call| move |e: io::Error| WriteError::new(call, path, e);
    let mut out = BufWriter::with_capacity(1 << 16, &pending.file);
    write(&mut out).map_err(fail(Call::Write))?;
    out.into_inner()
        .map_err(io::IntoInnerError::into_error)
        .map_err(fail(Call::Write))?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        pending
            .file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(fail(Call::Chmod))?;
    }
    pending.file.sync_all().map_err(fail(Call::Sync))?;
    Ok(pending)
}

/// The permission bits of the regular file at `path`, which a replacement keeps (as a
/// shell's `>` keeps the file it truncates); `None` where there is none.
fn kept_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.permissions().mode() & 0o777)
}

/// Write the output `path` with `write`, synced, into `unnamed` (an unnamed file beside it,
/// [`unnamed_beside`]) or, without one, under [`temp_path`]; then give it its name as
/// `naming` says (a replacement with the replaced file's permission bits) and sync its
/// directory, so that the name lasts ([`sync_parent`]). No name but `path`'s outlives the
/// call.
fn write_whole(
    path: &Path,
    naming: Naming,
    unnamed: Unnamed,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), WriteError> {
    write_whole_with(path, naming, unnamed, write, fsync_dir)
}

/// [`write_whole`], syncing the directory with `fsync` (tests make it fail).
fn write_whole_with(
    path: &Path,
    naming: Naming,
    unnamed: Unnamed,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    fsync: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<(), WriteError> {
    match naming {
        Naming::New => prepare(path, unnamed, None, write)?.name_new()?,
        Naming::Replace => prepare(path, unnamed, kept_mode(path), write)?.name_replacing()?,
    }
    sync_parent_with(path, fsync).inspect_err(|_| {
        // A new output is taken back (nothing is left under its name on failure); a
        // replacement cannot be, the file it replaced being gone.
        if let Naming::New = naming {
            let _ = std::fs::remove_file(path);
        }
    })
}

/// Write the output `path` with `write`, whole and synced, without giving it its name yet:
/// [`Pending::name_new`] does (so that several outputs can be written before any is named).
/// Once named, its directory is to be synced ([`sync_dir`], [`sync_parent`]).
pub fn pending(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Pending, WriteError> {
    prepare(path, unnamed_beside(path), None, write)
}

/// `open(2)` and `fsync(2)` of the directory `dir`.
fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Sync the directory `dir`, so that the names in it last (before it takes a name of its own,
/// say).
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    fsync_dir(dir).map_err(|e| WriteError::new(Call::SyncDirectory, dir, e))
}

/// Sync the directory `path` (a file or a directory) was just given its name in, so that the
/// name lasts: without it a crash may lose a name whose writing was reported done
/// ([`Call::SyncParent`]).
pub fn sync_parent(path: &Path) -> Result<(), WriteError> {
    sync_parent_with(path, fsync_dir)
}

fn sync_parent_with(path: &Path, fsync: impl FnOnce(&Path) -> io::Result<()>) -> Result<(), WriteError> {
    fsync(parent_dir(path)).map_err(|e| WriteError::new(Call::SyncParent, path, e))
}

/// Why an output was not written ([`write_replacing`]).
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    /// Something other than a regular file is at its path.
    #[error(transparent)]
    NotReplaceable(#[from] NotReplaceable),
    /// A call failed.
    #[error(transparent)]
    Write(#[from] WriteError),
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
/// writer it is given, replacing the file if it exists (the new file has its permission
/// bits); anything but a regular file is refused and left as it is.
pub fn write_replacing(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), ReplaceError> {
    let target = replace_target(path)?;
    Ok(write_whole(
        &target,
        Naming::Replace,
        unnamed_beside(&target),
        write,
    )?)
}

/// Write `bytes` to `path`, which must not exist ([`link_new`]: nothing is ever overwritten).
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
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
        let ReplaceError::Write(w) = &e else { panic!("{e}") };
        assert_eq!(w.call, Call::Write);
        assert!(
            e.to_string().ends_with("old.json failed: the writer failed"),
            "{e}"
        );
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
        write_whole(&out, Naming::Replace, Unnamed::Unsupported, watch).unwrap();
        assert_eq!(during, [temp_path(&out).file_name().unwrap()]);
        assert_eq!(names(&dir), ["out.json"]);
        std::fs::write(temp_path(&out), b"theirs").unwrap();
        let e = write_whole(&out, Naming::Replace, Unnamed::Unsupported, bytes(b"mine")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(temp_path(&out)).unwrap(), b"theirs");
        assert_eq!(std::fs::read(&out).unwrap(), b"data");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A replacement was a new file with mode 0666 less the umask: a trace written over a 0600
    /// file left it 0644 (a shell's `>` keeps the mode). With unnamed files and without.
    #[test]
    fn a_replaced_file_keeps_its_permission_bits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let p = dir.join("trace.json");
        for (bits, unnamed) in [(0o600, true), (0o640, false), (0o755, true)] {
            std::fs::write(&p, b"old").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(bits)).unwrap();
            let file = if unnamed {
                unnamed_beside(&p)
            } else {
                Unnamed::Unsupported
            };
            assert_eq!(
                matches!(file, Unnamed::File(_)),
                unnamed,
                "the tests' directory has unnamed files"
            );
            write_whole(&p, Naming::Replace, file, bytes(b"new")).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"new");
            assert_eq!(mode(&p), bits, "{bits:o}, unnamed: {unnamed}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_replacing(&p, bytes(b"newer")).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(names(&dir), ["trace.json"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Every failure names its call and path.
    #[test]
    fn a_failed_write_names_its_call() {
        let dir = scratch("calls");
        let out = dir.join("out.json");
        std::fs::write(temp_path(&out), b"theirs").unwrap();
        let e = write_whole(&out, Naming::New, Unnamed::Unsupported, bytes(b"x")).unwrap_err();
        assert_eq!(
            (e.call, e.kind()),
            (Call::CreateTemporary, io::ErrorKind::AlreadyExists)
        );
        let tmp = temp_path(&out).display().to_string();
        assert!(
            e.to_string()
                .starts_with(&format!("creating the temporary file {tmp}")),
            "{e}"
        );
        std::fs::remove_file(temp_path(&out)).unwrap();
        // A directory in the way of a rename.
        let sub = dir.join("sub");
        std::fs::create_dir_all(sub.join("x")).unwrap();
        let e = write_whole(&sub, Naming::Replace, Unnamed::Unsupported, bytes(b"x")).unwrap_err();
        assert_eq!(e.call, Call::Rename);
        let msg = e.to_string();
        let sub_tmp = temp_path(&sub).display().to_string();
        assert!(
            msg.starts_with(&format!("renaming {sub_tmp} to {}", sub.display())),
            "{msg}"
        );
        let e = write_new(&out, b"x")
            .and_then(|()| write_new(&out, b"y"))
            .unwrap_err();
        assert_eq!(
            (e.call, e.kind()),
            (Call::LinkUnnamed, io::ErrorKind::AlreadyExists)
        );
        assert_eq!(names(&dir), ["out.json", "sub"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The directory an output was named in was never synced, so a crash could lose a name
    /// whose writing was reported done. Its failure is an error of its own, naming the call,
    /// the directory and the output; a new output is taken back, a replacement cannot be.
    #[test]
    fn a_failed_sync_of_the_outputs_directory_is_its_own_error() {
        let dir = scratch("sync-parent");
        let out = dir.join("out.json");
        let eio = |_: &Path| Err(io::Error::from_raw_os_error(libc::EIO));
        for unnamed in [true, false] {
            let file = if unnamed {
                unnamed_beside(&out)
            } else {
                Unnamed::Unsupported
            };
            let e = write_whole_with(&out, Naming::New, file, bytes(b"new"), eio).unwrap_err();
            assert_eq!(
                (e.call, e.source.raw_os_error()),
                (Call::SyncParent, Some(libc::EIO))
            );
            assert_eq!(e.path, out);
            assert_eq!(
                e.to_string(),
                format!(
                    "syncing the directory {} after naming {} in it (fsync) failed: {}",
                    dir.display(),
                    out.display(),
                    e.source
                )
            );
            assert!(names(&dir).is_empty(), "unnamed: {unnamed}: {:?}", names(&dir));
        }
        std::fs::write(&out, b"old").unwrap();
        let e = write_whole_with(&out, Naming::Replace, unnamed_beside(&out), bytes(b"new"), eio);
        assert_eq!(e.unwrap_err().call, Call::SyncParent);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"new",
            "the old file is gone already"
        );
        assert_eq!(names(&dir), ["out.json"]);
        // A real failure: a directory that cannot be opened.
        let e = sync_parent(&dir.join("gone/out.json")).unwrap_err();
        assert_eq!((e.call, e.kind()), (Call::SyncParent, io::ErrorKind::NotFound));
        assert!(
            e.to_string()
                .starts_with(&format!("syncing the directory {}", dir.join("gone").display())),
            "{e}"
        );
        // And the syncs that succeed are made: every output is still written.
        write_new(&dir.join("new.json"), b"x").unwrap();
        write_replacing(&out, bytes(b"newer")).unwrap();
        assert_eq!(names(&dir), ["new.json", "out.json"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `O_TMPFILE` failing with `EMFILE` was taken for "no unnamed files" and its error
    /// dropped; the temporary file tried instead then failed with the same cause, reported as
    /// a failed `open O_EXCL` alone. Both are reported now, the unnamed file's first.
    #[test]
    fn a_failed_unnamed_file_is_reported_with_the_temporary_files_failure() {
        let dir = scratch("unnamed-error");
        let out = dir.join("out.json");
        let tmp = temp_path(&out);
        std::fs::write(&tmp, b"theirs").unwrap();
        let emfile = Unnamed::Failed(io::Error::from_raw_os_error(libc::EMFILE));
        let e = write_whole(&out, Naming::New, emfile, bytes(b"x")).unwrap_err();
        assert_eq!(e.call, Call::CreateTemporary);
        assert_eq!(
            e.unnamed.as_ref().and_then(io::Error::raw_os_error),
            Some(libc::EMFILE)
        );
        assert_eq!(
            e.to_string(),
            format!(
                "creating an unnamed file in {} (open O_TMPFILE) failed: {}; then creating the \
                 temporary file {} (open O_EXCL) failed: {}",
                dir.display(),
                io::Error::from_raw_os_error(libc::EMFILE),
                tmp.display(),
                e.source
            )
        );
        // Without unnamed files there is nothing to report but the temporary file's failure.
        let e = write_whole(&out, Naming::New, Unnamed::Unsupported, bytes(b"x")).unwrap_err();
        assert!(e.unnamed.is_none());
        assert!(e.to_string().starts_with("creating the temporary file"), "{e}");
        // Where the temporary file can be made, the output is written all the same.
        std::fs::remove_file(&tmp).unwrap();
        let emfile = Unnamed::Failed(io::Error::from_raw_os_error(libc::EMFILE));
        write_whole(&out, Naming::New, emfile, bytes(b"x")).unwrap();
        assert_eq!(names(&dir), ["out.json"]);
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
