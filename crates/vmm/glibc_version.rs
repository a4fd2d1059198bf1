//! The version of the glibc this machine builds against, as `getconf GNU_LIBC_VERSION` reports
//! it: shared by the build script (which packs relocations from 2.36 on) and the test that
//! checks the binary it linked.

use std::process::Command;

/// What `getconf GNU_LIBC_VERSION` printed ("glibc 2.36"; empty if it could not run), and its
/// `(major, minor)` if it is a glibc version.
pub fn glibc_version() -> (String, Option<(u32, u32)>) {
    let text = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let version = parse(&text);
    (text, version)
}

fn parse(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.strip_prefix("glibc ")?.split_once('.')?;
    let minor = minor.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The first glibc whose static-PIE start-up applies packed relative relocations (DT_RELR).
pub const RELR_GLIBC: (u32, u32) = (2, 36);
