//! Input files a VMM reads (firmware, guest scripts, cost files, kernels): opened without
//! blocking, regular files only, read with a size limit per kind of input.
//!
//! One rule for every file a user names, so that no input can hang the VMM or exhaust its
//! memory:
//!
//! - the file is opened with `O_NONBLOCK`, so a FIFO nobody writes to cannot block `open(2)`;
//! - anything but a regular file (a FIFO, a character device such as `/dev/zero`, a directory, a
//!   socket) is refused before a byte is read: its size is unknown and its read may never end;
//! - a regular file larger than its kind's [`InputKind::limit`] is refused from its size, and
//!   reads stop at the limit even if the file grows meanwhile.
//!
//! Every refusal is one line naming the input (the option and the path) and the rule it broke.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use crate::file_bytes::FileBytes;
use crate::file_bytes::HUGE_MIN;

/// A kind of input file: what it is, for messages, and the most bytes it may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputKind {
    /// What the file holds ("a cost file"), for messages.
    pub what: &'static str,
    /// The largest size accepted, in bytes.
    pub limit: u64,
}

/// Why an input file was refused. Displays as one line: `OPTION PATH: RULE`.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// `open(2)` or `fstat(2)` failed.
    #[error("{option} {}: cannot read it: {source}", path.display())]
    Open {
        /// The option (or other name) the path was given with.
        option: String,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `-`, which other tools take for standard input: inputs here are regular files.
    #[error(
        "{option} -: standard input is not read: {what} must be a regular file (./- names a file called '-')"
    )]
    StandardInput {
        /// The option the path was given with.
        option: String,
        /// What the file should hold.
        what: &'static str,
    },
    /// Not a regular file.
    #[error(
        "{option} {}: is {file_type}, not a regular file: {what} must be a regular file (its size must be known \
         and its read must end)",
        path.display()
    )]
    NotRegular {
        /// The option the path was given with.
        option: String,
        /// The path.
        path: PathBuf,
        /// What it is instead ("a FIFO", "a character device", ...).
        file_type: &'static str,
        /// What the file should hold.
        what: &'static str,
    },
    /// Larger than the limit of its kind.
    #[error(
        "{option} {}: is {size} bytes: {what} may be at most {} ({limit} bytes)",
        path.display(),
        human(*limit)
    )]
    TooLarge {
        /// The option the path was given with.
        option: String,
        /// The path.
        path: PathBuf,
        /// Its size (at least this; a growing file is cut off at `limit + 1`).
        size: u64,
        /// The limit.
        limit: u64,
        /// What the file should hold.
        what: &'static str,
    },
    /// Reading failed.
    #[error("{option} {}: cannot read it: {source}", path.display())]
    Read {
        /// The option the path was given with.
        option: String,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A text input that is not UTF-8.
    #[error("{option} {}: is not UTF-8 text: {what} must be UTF-8", path.display())]
    NotUtf8 {
        /// The option the path was given with.
        option: String,
        /// The path.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
    },
}

/// `limit` in the largest binary unit that divides it ("16 MiB").
fn human(limit: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if limit >= 1 << shift && limit.is_multiple_of(1 << shift) {
            return format!("{} {unit}", limit >> shift);
        }
    }
    format!("{limit} bytes")
}

/// What a file is, for messages: "a regular file", "a directory", "a FIFO", "a character
/// device", "a block device", "a socket", "a symbolic link".
pub fn file_type_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "of an unknown type"
    }
}

/// An opened input file: a regular file no larger than its kind's limit.
#[derive(Debug)]
pub struct InputFile {
    file: File,
    len: u64,
    option: String,
    path: PathBuf,
    kind: InputKind,
}

impl InputFile {
    /// Open `path`, given with `option` (e.g. `"--costs"`), as an input of `kind`: without
    /// blocking, refusing anything but a regular file of at most `kind.limit` bytes.
    pub fn open(option: &str, path: &Path, kind: InputKind) -> Result<Self, InputError> {
        if path.as_os_str() == "-" {
            return Err(InputError::StandardInput {
                option: option.to_owned(),
                what: kind.what,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| InputError::Open {
                option: option.to_owned(),
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| InputError::Open {
            option: option.to_owned(),
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(InputError::NotRegular {
                option: option.to_owned(),
                path: path.to_path_buf(),
                file_type: file_type_name(meta.file_type()),
                what: kind.what,
            });
        }
        let this = Self {
            file,
            len: meta.len(),
            option: option.to_owned(),
            path: path.to_path_buf(),
            kind,
        };
        this.check_size(meta.len())?;
        Ok(this)
    }

    fn check_size(&self, size: u64) -> Result<(), InputError> {
        if size > self.kind.limit {
            return Err(InputError::TooLarge {
                option: self.option.clone(),
                path: self.path.clone(),
                size,
                limit: self.kind.limit,
                what: self.kind.what,
            });
        }
        Ok(())
    }

    /// A read of this file that failed with `source`.
    fn read_error(&self, source: io::Error) -> InputError {
        InputError::Read {
            option: self.option.clone(),
            path: self.path.clone(),
            source,
        }
    }

    /// The file's size when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file was empty when it was opened.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Feed the whole file to `sink` (at most the limit: a file that grew past it is refused).
    pub fn copy_to(self, sink: &mut impl io::Write) -> Result<u64, InputError> {
        let limit = self.kind.limit;
        let n = io::copy(&mut (&self.file).take(limit.saturating_add(1)), sink)
            .map_err(|e| self.read_error(e))?;
        self.check_size(n)?;
        Ok(n)
    }

    /// The whole file (at most the limit: a file that grew past it is refused).
    pub fn read_all(self) -> Result<Vec<u8>, InputError> {
        let mut data = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        self.copy_to(&mut data)?;
        Ok(data)
    }

    /// The whole file, as [`Self::read_all`], in memory on transparent huge pages where the
    /// kernel offers them when the file is at least 1 MiB (see [`FileBytes`]): for firmware
    /// images, whose page faults on a fresh heap buffer cost more than reading them.
    pub fn read_all_huge(self) -> Result<FileBytes, InputError> {
        let mut buf = self.buffer();
        let filled = self.read_into(&mut buf, usize::MAX, &mut |_| {})?;
        self.finish_read(buf, filled)
    }

    /// A zeroed buffer for the whole file as it was when opened, to fill with
    /// [`Self::read_into`]: on transparent huge pages where the kernel offers them when the
    /// file is at least 1 MiB (see [`FileBytes`]), else on the heap.
    pub fn buffer(&self) -> FileBytes {
        // Within the limit, which a usize holds on the 64-bit hosts KVM runs on.
        let len = usize::try_from(self.len).unwrap_or(usize::MAX);
        (self.len >= HUGE_MIN)
            .then(|| FileBytes::huge_zeroed(len))
            .flatten()
            .unwrap_or_else(|| vec![0; len].into())
    }

    /// Read the file from where its reading stands (its start, the first time) into `buf`, in
    /// pieces of `piece` bytes, giving each to `arrived` as soon as it is in memory (for a
    /// caller that hashes a firmware image while the rest of it is read). Returns how many
    /// bytes were read: fewer than `buf` holds if the file ended first (it shrank since it was
    /// opened). Pieces are `piece` bytes long but the last.
    pub fn read_into<'b>(
        &self,
        buf: &'b mut [u8],
        piece: usize,
        arrived: &mut dyn FnMut(&'b [u8]),
    ) -> Result<usize, InputError> {
        let mut rest = buf;
        let mut filled = 0;
        while !rest.is_empty() {
            let (head, tail) = rest.split_at_mut(piece.clamp(1, rest.len()));
            let n = self.fill(head)?;
            filled += n;
            let whole = n == head.len();
            let head: &'b [u8] = head;
            if n > 0 {
                arrived(&head[..n]);
            }
            if !whole {
                break;
            }
            rest = tail;
        }
        Ok(filled)
    }

    /// Fill `buf` from the file, or as much of it as the file still has.
    fn fill(&self, buf: &mut [u8]) -> Result<usize, InputError> {
        let mut filled = 0;
        while filled < buf.len() {
            match (&self.file).read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e)),
            }
        }
        Ok(filled)
    }

    /// The file's bytes, from a [`Self::buffer`] that [`Self::read_into`] filled with `filled`
    /// bytes: cut to them if the file shrank since it was opened (what is there is the file),
    /// and with the rest of the file after them (up to the limit: a file that grew past it is
    /// refused) if it grew.
    pub fn finish_read(self, mut buf: FileBytes, filled: usize) -> Result<FileBytes, InputError> {
        if filled < buf.len() {
            buf.truncate(filled);
            return Ok(buf);
        }
        let mut rest = Vec::new();
        (&self.file)
            .take(self.kind.limit.saturating_add(1).saturating_sub(self.len))
            .read_to_end(&mut rest)
            .map_err(|e| self.read_error(e))?;
        if rest.is_empty() {
            return Ok(buf);
        }
        let mut all = Vec::with_capacity(buf.len() + rest.len());
        all.extend_from_slice(&buf);
        all.append(&mut rest);
        self.check_size(all.len() as u64)?;
        Ok(all.into())
    }

    /// The whole file as UTF-8 text.
    pub fn read_text(self) -> Result<String, InputError> {
        let option = self.option.clone();
        let path = self.path.clone();
        let what = self.kind.what;
        String::from_utf8(self.read_all()?).map_err(|_| InputError::NotUtf8 { option, path, what })
    }
}

/// [`InputFile::open`] then [`InputFile::read_all`].
pub fn read(option: &str, path: &Path, kind: InputKind) -> Result<Vec<u8>, InputError> {
    InputFile::open(option, path, kind)?.read_all()
}

/// [`InputFile::open`] then [`InputFile::read_text`].
pub fn read_text(option: &str, path: &Path, kind: InputKind) -> Result<String, InputError> {
    InputFile::open(option, path, kind)?.read_text()
}

/// `text` as it may appear inside a one-line message: control characters (a newline, a tab, a
/// terminal escape) are written as Rust escapes (`\n`, `\t`, `\u{1b}`), everything else as it
/// is. Parsers quote what the user wrote in their refusals (a field name, an operation), and
/// that text may hold any character a file or an argument can.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: InputKind = InputKind {
        what: "a test file",
        limit: 8,
    };

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmsa-host-input-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let st = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(st.success());
        // Without O_NONBLOCK this open never returns; run it on a thread and give up after 10 s.
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || tx.send(read("--x", &f, KIND).map(|_| ())));
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("open of a FIFO blocked");
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("--x {}: is a FIFO", fifo.display())),
            "{e}"
        );
        assert!(e.contains("a test file must be a regular file"), "{e}");
        assert_eq!(e.lines().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn devices_and_directories_are_refused() {
        let e = read("--x", Path::new("/dev/zero"), KIND).unwrap_err().to_string();
        assert!(e.starts_with("--x /dev/zero: is a character device"), "{e}");
        let e = read("--x", Path::new("/"), KIND).unwrap_err().to_string();
        assert!(e.starts_with("--x /: is a directory"), "{e}");
        let e = read("--x", Path::new("/no/such/file"), KIND)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--x /no/such/file: cannot read it"), "{e}");
        // `-` read as a file called `-` (or refused as missing): it is standard input to a
        // user of other tools; refused as such, whatever the working directory holds.
        let e = read("--x", Path::new("-"), KIND).unwrap_err().to_string();
        assert_eq!(
            e,
            "--x -: standard input is not read: a test file must be a regular file (./- names a file called '-')"
        );
    }

    #[test]
    fn large_files_read_into_huge_pages_as_read_all_reads_them() {
        let dir = scratch("huge");
        let path = dir.join("image");
        let data: Vec<u8> = (0..HUGE_MIN as usize + 4099).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let kind = InputKind {
            what: "an image",
            limit: 4 << 20,
        };
        let read = InputFile::open("--x", &path, kind)
            .unwrap()
            .read_all_huge()
            .unwrap();
        assert_eq!(*read, data[..]);
        assert!(format!("{read:?}").contains("huge-page memory"), "{read:?}");
        // A small file goes to the heap.
        let small = dir.join("small");
        std::fs::write(&small, b"abc").unwrap();
        let read = InputFile::open("--x", &small, kind)
            .unwrap()
            .read_all_huge()
            .unwrap();
        assert_eq!(*read, b"abc"[..]);
        // Grown after open, within the limit: all of it, as read_all.
        let file = InputFile::open("--x", &path, kind).unwrap();
        let mut grown = data.clone();
        grown.extend_from_slice(b"tail");
        std::fs::write(&path, &grown).unwrap();
        assert_eq!(*file.read_all_huge().unwrap(), grown[..]);
        // Grown past the limit after open: refused.
        let file = InputFile::open("--x", &path, kind).unwrap();
        std::fs::write(&path, vec![1; (4 << 20) + 1]).unwrap();
        let e = file.read_all_huge().unwrap_err().to_string();
        assert!(e.contains("an image may be at most 4 MiB"), "{e}");
        // Shrunk after open: what is left.
        std::fs::write(&path, &data).unwrap();
        let file = InputFile::open("--x", &path, kind).unwrap();
        std::fs::write(&path, &data[..HUGE_MIN as usize]).unwrap();
        assert_eq!(*file.read_all_huge().unwrap(), data[..HUGE_MIN as usize]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_read_in_pieces_hands_over_each_piece_once_in_order() {
        let dir = scratch("pieces");
        let path = dir.join("image");
        let data: Vec<u8> = (0..HUGE_MIN as usize + 3 * 4096 + 5)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let kind = InputKind {
            what: "an image",
            limit: 4 << 20,
        };
        for piece in [1 << 16, 4096, 4095, usize::MAX] {
            let file = InputFile::open("--x", &path, kind).unwrap();
            let mut buf = file.buffer();
            let mut seen: Vec<Vec<u8>> = Vec::new();
            let filled = file
                .read_into(&mut buf, piece, &mut |p| seen.push(p.to_vec()))
                .unwrap();
            assert_eq!(filled, data.len());
            assert!(seen[..seen.len() - 1].iter().all(|p| p.len() == piece), "{piece}");
            assert_eq!(seen.concat(), data, "{piece}");
            assert_eq!(*file.finish_read(buf, filled).unwrap(), data[..]);
        }
        // Shrunk after open: the pieces stop where the file does, and so do the bytes.
        let file = InputFile::open("--x", &path, kind).unwrap();
        std::fs::write(&path, &data[..5000]).unwrap();
        let mut buf = file.buffer();
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let filled = file
            .read_into(&mut buf, 4096, &mut |p| seen.push(p.to_vec()))
            .unwrap();
        assert_eq!((filled, seen.len()), (5000, 2));
        assert_eq!(seen.concat(), data[..5000]);
        assert_eq!(*file.finish_read(buf, filled).unwrap(), data[..5000]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn limits_read_in_binary_units() {
        assert_eq!(human(16 << 20), "16 MiB");
        assert_eq!(human(4 << 30), "4 GiB");
        assert_eq!(human(1536), "1536 bytes");
        assert_eq!(human(2048), "2 KiB");
    }

    #[test]
    fn one_line_escapes_control_characters_only() {
        assert_eq!(one_line("unknown `a b`: é"), "unknown `a b`: é");
        assert_eq!(one_line("a\nb\tc\u{1b}[2J\0"), "a\\nb\\tc\\u{1b}[2J\\u{0}");
    }

    #[test]
    fn sizes_up_to_the_limit_are_read_and_larger_refused() {
        let dir = scratch("size");
        let ok = dir.join("ok");
        std::fs::write(&ok, b"12345678").unwrap();
        assert_eq!(read("--x", &ok, KIND).unwrap(), b"12345678");
        assert_eq!(read_text("--x", &ok, KIND).unwrap(), "12345678");
        let big = dir.join("big");
        std::fs::write(&big, b"123456789").unwrap();
        let e = read("--x", &big, KIND).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "--x {}: is 9 bytes: a test file may be at most 8 bytes (8 bytes)",
                big.display()
            )
        );
        let bin = dir.join("bin");
        std::fs::write(&bin, b"\xff").unwrap();
        let e = read_text("--x", &bin, KIND).unwrap_err().to_string();
        assert!(e.ends_with("is not UTF-8 text: a test file must be UTF-8"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
