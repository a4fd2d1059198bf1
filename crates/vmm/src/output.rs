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

/// Write `bytes` to `path`, replacing it if it exists (renamed into place).
pub fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    through_temp(path, bytes, |tmp, path| std::fs::rename(tmp, path))
}

/// Write `bytes` to `path`, which must not exist (hard-linked into place, which fails if
/// `path` appeared meanwhile: nothing is ever overwritten).
pub fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    through_temp(path, bytes, |tmp, path| std::fs::hard_link(tmp, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_or_refuses_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("vmm-output-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
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
}
