//! `--dump-vmsa DIR`: the launch VMSAs as `vmsa<N>.bin` files (the names and bytes
//! sev-snp-measure's `--dump-vmsa` writes into its working directory), written all or nothing.
//! A new DIR is built as a fresh sibling directory and renamed into place; an existing empty DIR
//! is kept as it is (its owner, mode and mount stay) and filled with files written under
//! temporary names first, linked to their names at the end (never over a file).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::MeasureError;
use super::plan::VmsaUpdate;

fn dir_error(path: &Path, rule: impl Into<String>) -> MeasureError {
    MeasureError::DumpDir {
        path: path.to_path_buf(),
        rule: rule.into(),
    }
}

/// Check DIR before any work: it must name a directory that does not exist or is empty
/// (nothing is overwritten), in an existing parent directory.
pub(crate) fn check_dir(dir: &Path) -> Result<(), MeasureError> {
    if dir.file_name().is_none_or(|n| n.is_empty()) {
        return Err(dir_error(dir, "must name a directory (not '/', '.' or '..')"));
    }
    if let Some(problem) = crate::output::unusable(dir) {
        return Err(dir_error(dir, problem.to_string()));
    }
    // DIR may be a symbolic link to a directory (filled through it, as `cp` would); one that
    // points nowhere is refused, since renaming the new directory into place would replace it.
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if fs::symlink_metadata(dir).is_ok() {
                return Err(dir_error(
                    dir,
                    "is a symbolic link to nothing (refusing to replace it)",
                ));
            }
        }
        Err(e) => return Err(dir_error(dir, format!("cannot inspect it: {e}"))),
        Ok(m) if !m.is_dir() => {
            return Err(dir_error(
                dir,
                format!(
                    "exists and is {}, not a directory (refusing to overwrite)",
                    vmsa_host::input::file_type_name(m.file_type())
                ),
            ));
        }
        Ok(_) => {
            let mut entries =
                fs::read_dir(dir).map_err(|e| dir_error(dir, format!("cannot list it: {e}")))?;
            if entries.next().is_some() {
                return Err(dir_error(dir, "exists and is not empty (refusing to overwrite)"));
            }
        }
    }
    Ok(())
}

/// Write `vmsa<N>.bin` for every VMSA into DIR, atomically; returns how many were written.
pub(crate) fn write<'a>(
    dir: &Path,
    vmsas: impl Iterator<Item = &'a VmsaUpdate>,
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
    fs::create_dir(&tmp).map_err(werr)?;
    let result = (|| {
        let mut n = 0;
        for v in vmsas {
            fs::write(tmp.join(format!("vmsa{}.bin", v.vcpu.0)), v.save_area.as_page())?;
            n += 1;
        }
        // Replaces DIR only if it is (still) an empty directory.
        fs::rename(&tmp, dir)?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map_err(werr)
}

/// Fill the existing empty directory `dir`: every file under a temporary name first, then each
/// linked to its name; on any failure every file this call put there is removed again.
fn fill<'a>(dir: &Path, vmsas: impl Iterator<Item = &'a VmsaUpdate>) -> io::Result<usize> {
    let mut temps: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut linked: Vec<&Path> = Vec::new();
    let mut result = (|| {
        for v in vmsas {
            let done = dir.join(format!("vmsa{}.bin", v.vcpu.0));
            let tmp = crate::output::temp_path(&done);
            temps.push((tmp.clone(), done));
            fs::write(&tmp, v.save_area.as_page())?;
        }
        Ok(temps.len())
    })();
    if result.is_ok() {
        for (tmp, done) in &temps {
            // Not a plain rename: the name may have appeared since the directory was found
            // empty (another writer), and a rename would silently replace it.
            if let Err(e) = crate::output::link_new(tmp, done) {
                result = Err(e);
                break;
            }
            linked.push(done);
        }
    }
    for (tmp, _) in &temps {
        let _ = fs::remove_file(tmp);
    }
    if result.is_err() {
        for done in linked {
            let _ = fs::remove_file(done);
        }
    }
    result
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
