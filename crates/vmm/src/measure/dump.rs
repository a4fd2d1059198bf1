//! `--dump-vmsa DIR`: the launch VMSAs as `vmsa<N>.bin` files (the names and bytes
//! sev-snp-measure's `--dump-vmsa` writes into its working directory), written all or nothing.
//! A new DIR is built as a fresh sibling directory and renamed into place; an existing empty DIR
//! is kept as it is (its owner, mode and mount stay) and filled file by file, each written
//! unnamed (or under a temporary name) and linked to its name as soon as it is whole (never
//! over a file), so that only one file is open at a time whatever the number of vCPUs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::{DumpDirProblem, MeasureError};
use super::plan::VmsaUpdate;
use crate::output::{Call, WriteError};

fn dir_error(path: &Path, problem: DumpDirProblem) -> MeasureError {
    MeasureError::DumpDir {
        path: path.to_path_buf(),
        problem,
    }
}

/// Check DIR before any work: it must name a directory that does not exist or is empty
/// (nothing is overwritten), in an existing parent directory.
pub(crate) fn check_dir(dir: &Path) -> Result<(), MeasureError> {
    if dir.file_name().is_none_or(|n| n.is_empty()) {
        return Err(dir_error(dir, DumpDirProblem::NoName));
    }
    if let Some(problem) = crate::output::unusable(dir) {
        return Err(dir_error(dir, problem.into()));
    }
    // DIR may be a symbolic link to a directory (filled through it, as `cp` would); one that
    // points nowhere is refused, since renaming the new directory into place would replace it.
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if fs::symlink_metadata(dir).is_ok() {
                return Err(dir_error(dir, DumpDirProblem::DanglingLink));
            }
        }
        Err(e) => return Err(dir_error(dir, DumpDirProblem::Inspect(e))),
        Ok(m) if !m.is_dir() => {
            return Err(dir_error(
                dir,
                DumpDirProblem::NotADirectory(vmsa_host::input::file_type_name(m.file_type())),
            ));
        }
        Ok(_) => {
            let mut entries = fs::read_dir(dir).map_err(|e| dir_error(dir, DumpDirProblem::List(e)))?;
            if entries.next().is_some() {
                return Err(dir_error(dir, DumpDirProblem::NotEmpty));
            }
        }
    }
    Ok(())
}

/// The file `vmsa<N>.bin` of `v` in `dir`.
fn file_name(dir: &Path, v: &VmsaUpdate) -> PathBuf {
    dir.join(format!("vmsa{}.bin", v.vcpu.0))
}

/// Write `vmsa<N>.bin` of `v` into `dir`, whole and synced before it has its name (which
/// must be free), closing it; the directory is left for the caller to sync.
fn put(dir: &Path, v: &VmsaUpdate) -> Result<PathBuf, WriteError> {
    let done = file_name(dir, v);
    crate::output::pending(&done, |w| w.write_all(v.save_area.as_page()))?.name_new()?;
    Ok(done)
}

/// Write `vmsa<N>.bin` for every VMSA into DIR, atomically, each file through the output
/// module (whole and synced before it has its name); returns how many were written. A new DIR
/// is synced in its parent directory once it has its name, so that it lasts.
pub(crate) fn write<'a>(
    dir: &Path,
    vmsas: impl Iterator<Item = &'a VmsaUpdate>,
) -> Result<usize, MeasureError> {
    write_with(dir, vmsas, crate::output::sync_parent)
}

/// [`write`], syncing DIR's parent directory with `sync_parent` (tests make it fail).
fn write_with<'a>(
    dir: &Path,
    vmsas: impl Iterator<Item = &'a VmsaUpdate>,
    sync_parent: impl FnOnce(&Path) -> Result<(), WriteError>,
) -> Result<usize, MeasureError> {
    check_dir(dir)?;
    let werr = |source| MeasureError::DumpWrite {
        path: dir.to_path_buf(),
        source,
    };
    if dir.is_dir() {
        return fill(dir, vmsas).map_err(werr);
    }
    let tmp = crate::output::temp_path(dir);
    fs::create_dir(&tmp).map_err(|e| werr(WriteError::new(Call::CreateDirectory, &tmp, e)))?;
    let result = (|| {
        let mut n = 0;
        for v in vmsas {
            put(&tmp, v)?;
            n += 1;
        }
        // The files' names last before the directory takes its name.
        crate::output::sync_dir(&tmp)?;
        // Replaces DIR only if it is (still) an empty directory.
        fs::rename(&tmp, dir).map_err(|e| WriteError::naming(Call::Rename, &tmp, dir, e))?;
        // DIR's own name lasts (and the temporary one is gone for good) before success.
        if let Err(e) = sync_parent(dir) {
            // All or nothing: the directory this call made is taken back.
            let _ = fs::remove_dir_all(dir);
            return Err(e);
        }
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map_err(werr)
}

/// Fill the existing empty directory `dir`: each file written whole and synced (unnamed, or
/// under a temporary name) and linked to its name before the next is begun, so that one file
/// at a time is open (an unnamed file stays open until it is linked: all of them at once ran
/// out of descriptors, `EMFILE`, for a few hundred vCPUs); then the directory synced. On any
/// failure every file this call put there is removed again.
fn fill<'a>(dir: &Path, vmsas: impl Iterator<Item = &'a VmsaUpdate>) -> Result<usize, WriteError> {
    let mut linked: Vec<PathBuf> = Vec::new();
    let mut result = Ok(());
    for v in vmsas {
        // Never over a file: the name may have appeared since the directory was found empty
        // (another writer), and a rename would silently replace it.
        match put(dir, v) {
            Ok(done) => linked.push(done),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = crate::output::sync_dir(dir);
    }
    if result.is_err() {
        for done in &linked {
            let _ = fs::remove_file(done);
        }
    }
    result.map(|()| linked.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{names, scratch};
    use vmsa_core::{SevEsSaveArea, VcpuId};

    fn vmsas(n: u32) -> Vec<VmsaUpdate> {
        (0..n)
            .map(|i| {
                let mut save_area = SevEsSaveArea::boxed();
                save_area.rip = u64::from(i);
                VmsaUpdate {
                    vcpu: VcpuId(i),
                    save_area,
                }
            })
            .collect()
    }

    #[test]
    fn writes_new_or_empty_directories() {
        let root = scratch("ok");
        let d = root.join("out");
        assert_eq!(write(&d, vmsas(3).iter()).unwrap(), 3);
        let b = fs::read(d.join("vmsa2.bin")).unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(b[0x178], 2);
        let empty = root.join("empty");
        fs::create_dir(&empty).unwrap();
        assert_eq!(write(&empty, vmsas(1).iter()).unwrap(), 1);
        // Nothing but the two results remains.
        assert_eq!(names(&root), ["empty", "out"]);
        fs::remove_dir_all(root).unwrap();
    }

    /// The message named no call: "cannot write the VMSA files: No such file or directory"
    /// where the rename of the finished directory failed (`d2/.` names no directory to make).
    #[test]
    fn a_failed_rename_is_named_and_leaves_nothing() {
        let root = scratch("dump-rename");
        let d = root.join("d2/.");
        let e = write(&d, vmsas(2).iter()).unwrap_err();
        let MeasureError::DumpWrite { source, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(source.call, Call::Rename);
        let tmp = crate::output::temp_path(&d);
        assert_eq!(
            e.to_string(),
            format!(
                "--dump-vmsa {}: cannot write the VMSA files: renaming {} to {} (rename) failed: {}",
                d.display(),
                tmp.display(),
                d.display(),
                source.source
            )
        );
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert!(names(&root).is_empty(), "{:?}", names(&root));
        fs::remove_dir_all(root).unwrap();
    }

    /// Each file is the whole page of its VMSA, and nothing else is left.
    #[test]
    fn every_dumped_file_is_whole() {
        let root = scratch("dump-whole");
        let updates = vmsas(4);
        for d in [root.join("new"), root.join("empty")] {
            if d.ends_with("empty") {
                fs::create_dir(&d).unwrap();
            }
            assert_eq!(write(&d, updates.iter()).unwrap(), 4);
            for v in &updates {
                assert_eq!(fs::read(file_name(&d, v)).unwrap(), v.save_area.as_page());
            }
            assert_eq!(names(&d).len(), 4, "{:?}", names(&d));
        }
        assert_eq!(names(&root), ["empty", "new"]);
        fs::remove_dir_all(root).unwrap();
    }

    /// The files were written with `fs::write` under temporary names, which truncated and then
    /// removed another writer's file that had one of them.
    #[test]
    fn a_file_at_a_temporary_name_is_neither_written_nor_removed() {
        let root = scratch("dump-theirs");
        let theirs = crate::output::temp_path(&root.join("vmsa0.bin"));
        fs::write(&theirs, b"theirs").unwrap();
        assert_eq!(fill(&root, vmsas(2).iter()).unwrap(), 2);
        assert_eq!(fs::read(&theirs).unwrap(), b"theirs");
        assert_eq!(fs::read(root.join("vmsa0.bin")).unwrap().len(), 4096);
        fs::remove_dir_all(root).unwrap();
    }

    /// The new directory's parent was never synced after the rename, so a crash could lose
    /// DIR (and keep `.DIR.tmp-PID`) after a reported success. Its failure is named, and
    /// leaves nothing; a success syncs it.
    #[test]
    fn a_failed_sync_of_the_new_directorys_parent_is_named_and_leaves_nothing() {
        let root = scratch("dump-sync-parent");
        let d = root.join("out");
        let mut synced = None;
        let record = |p: &Path| {
            synced = Some(p.to_path_buf());
            crate::output::sync_parent(p)
        };
        assert_eq!(write_with(&d, vmsas(2).iter(), record).unwrap(), 2);
        assert_eq!(synced.as_deref(), Some(d.as_path()));
        fs::remove_dir_all(&d).unwrap();
        let eio = |p: &Path| {
            Err(WriteError::new(
                Call::SyncParent,
                p,
                io::Error::from_raw_os_error(libc::EIO),
            ))
        };
        let e = write_with(&d, vmsas(2).iter(), eio).unwrap_err();
        let MeasureError::DumpWrite { source, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(source.call, Call::SyncParent);
        assert!(
            e.to_string().ends_with(&format!(
                "cannot write the VMSA files: syncing the directory {} after naming {} in it \
                 (fsync) failed: {}",
                root.display(),
                d.display(),
                source.source
            )),
            "{e}"
        );
        assert!(names(&root).is_empty(), "{:?}", names(&root));
        // An existing directory is not renamed, so its parent is not synced.
        fs::create_dir(&d).unwrap();
        assert_eq!(write_with(&d, vmsas(2).iter(), eio).unwrap(), 2);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_directory_name_need_not_be_utf8() {
        use std::os::unix::ffi::OsStrExt;
        // Linux names are bytes; sev-snp-measure's --dump-vmsa takes any of them too.
        let root = scratch("bytes");
        let d = root.join(std::ffi::OsStr::from_bytes(b"out\xff"));
        assert_eq!(write(&d, vmsas(2).iter()).unwrap(), 2);
        assert_eq!(fs::read(d.join("vmsa1.bin")).unwrap().len(), 4096);
        assert_eq!(
            names(&root),
            [d.file_name().unwrap()],
            "no temporary directory left"
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn an_existing_empty_directory_is_filled_not_replaced() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = scratch("keep");
        let d = root.join("mine");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o710)).unwrap();
        let before = fs::metadata(&d).unwrap();
        assert_eq!(write(&d, vmsas(2).iter()).unwrap(), 2);
        let after = fs::metadata(&d).unwrap();
        assert_eq!(after.ino(), before.ino(), "the same directory, not a replacement");
        assert_eq!(after.mode() & 0o7777, 0o710);
        assert_eq!(names(&d), ["vmsa0.bin", "vmsa1.bin"], "no temporary file left");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_file_that_appears_while_filling_is_neither_replaced_nor_removed() {
        // Another writer's file, made after this one found the directory empty.
        let root = scratch("race");
        fs::write(root.join("vmsa1.bin"), b"theirs").unwrap();
        let e = fill(&root, vmsas(3).iter()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(fs::read(root.join("vmsa1.bin")).unwrap(), b"theirs");
        assert_eq!(
            names(&root),
            ["vmsa1.bin"],
            "what this call wrote is gone, what it found stays"
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_symbolic_link_to_an_empty_directory_is_filled_through() {
        let root = scratch("dump-link");
        let target = root.join("target");
        fs::create_dir(&target).unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(write(&link, vmsas(2).iter()).unwrap(), 2);
        assert!(
            fs::symlink_metadata(&link).unwrap().is_symlink(),
            "the link stays"
        );
        assert_eq!(fs::read(target.join("vmsa1.bin")).unwrap().len(), 4096);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_and_leaves_nothing() {
        let root = scratch("refuse");
        let full = root.join("full");
        fs::create_dir(&full).unwrap();
        fs::write(full.join("keep"), b"x").unwrap();
        let file = root.join("file");
        fs::write(&file, b"x").unwrap();
        let fifo = root.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo {}", fifo.display());
        let dangling = root.join("dangling");
        std::os::unix::fs::symlink(root.join("nowhere"), &dangling).unwrap();
        for (dir, rule) in [
            (full.clone(), "not empty"),
            (file.clone(), "exists and is a regular file, not a directory"),
            (fifo.clone(), "exists and is a FIFO, not a directory"),
            (dangling.clone(), "is a symbolic link to nothing"),
            (root.join("missing/out"), "does not exist"),
            (PathBuf::from("/"), "must name"),
            (root.join(".."), "must name"),
        ] {
            let e = write(&dir, vmsas(2).iter()).unwrap_err().to_string();
            assert!(e.contains(rule), "{e}");
            assert!(e.starts_with("--dump-vmsa "), "{e}");
        }
        assert_eq!(fs::read(full.join("keep")).unwrap(), b"x");
        assert_eq!(fs::read_dir(&full).unwrap().count(), 1);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 4);
        assert!(
            fs::symlink_metadata(&dangling).unwrap().is_symlink(),
            "the link stays"
        );
        fs::remove_dir_all(root).unwrap();
    }
}
