//! Shared helpers for the `vmm measure` tests: the fixtures sev-snp-measure generated
//! (`cargo xtask fixtures`) and a way to run the real binary.

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;
use sha2::{Digest, Sha256};
use vmm_sys_util::tempdir::TempDir;

/// Check that `o`, what a run of `vmm` (`what`, for the messages) gave, is a refusal: exit 2,
/// nothing on stdout, one line on stderr that contains `needle`.
#[track_caller]
pub fn assert_refused(o: &Output, what: &str, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{what}: {e}");
    assert_eq!(e.lines().count(), 1, "{what}: {e}");
    assert!(e.contains(needle), "{what}: {e:?} lacks {needle:?}");
    assert!(o.stdout.is_empty(), "{what}: it went ahead: {}", stdout(o));
}

/// Run `vmm ARGS` and check it is refused ([`assert_refused`]) with a line that names `input`
/// and contains `rule`.
#[track_caller]
pub fn refused_with(args: &[&str], input: &str, rule: &str) {
    let o = vmm(args);
    assert_refused(&o, &format!("{args:?}"), input);
    let e = stderr(&o);
    assert!(e.contains(rule), "{e} does not say {rule}");
}

/// Debian's OVMF builds the fixtures were generated with (`apt-get install ovmf`).
pub const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// Debian's 4 MiB code-only OVMF build.
pub const DEBIAN_OVMF_CODE_4M: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// `target/fixtures/measure` of the workspace.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures/measure")
}

/// The parsed `cases.json`, after checking that the fixtures and the firmware they were made
/// from are present and unchanged.
pub fn fixtures() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        for fw in [DEBIAN_OVMF, DEBIAN_OVMF_CODE_4M] {
            assert!(
                Path::new(fw).exists(),
                "{fw} is missing: install Debian's OVMF (apt-get install ovmf); CI's .ci/run does"
            );
        }
        let path = fixture_dir().join("cases.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: generate the sev-snp-measure fixtures with `cargo xtask fixtures`",
                path.display()
            )
        });
        let doc: Value = serde_json::from_str(&text).expect("cases.json is JSON");
        for (fw, sha) in doc["firmware_sha256"].as_object().expect("firmware_sha256") {
            let have = hex(&Sha256::digest(std::fs::read(fw).expect("firmware readable")));
            assert_eq!(
                have,
                sha.as_str().unwrap(),
                "{fw} changed since the fixtures were generated: rerun `cargo xtask fixtures`"
            );
        }
        doc
    })
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The fixture cases `keep` keeps.
pub fn fixture_cases(keep: impl Fn(&Value) -> bool) -> Vec<&'static Value> {
    fixtures()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| keep(c))
        .collect()
}

/// A fixture path: absolute paths are system files, others live in the fixture directory.
pub fn fixture_path(p: &str) -> PathBuf {
    if p.starts_with('/') {
        PathBuf::from(p)
    } else {
        fixture_dir().join(p)
    }
}

/// The vCPU signature a fixture case's VMSAs carry: its `vcpu_type`'s, its `vcpu_sig`, or the
/// signature of its `vcpu_fms` (family, model, stepping); 0 without any.
pub fn case_vcpu_sig(case: &Value) -> u32 {
    use vmm::measure::vcpu_types::{VcpuType, cpu_sig};
    if let Some(t) = case["vcpu_type"].as_str() {
        return t.parse::<VcpuType>().unwrap().signature();
    }
    if let Some(sig) = case.get("vcpu_sig").and_then(Value::as_str) {
        return vmm::measure::parse_vcpu_sig(sig).unwrap();
    }
    match case.get("vcpu_fms").and_then(Value::as_array) {
        Some(fms) => {
            let n = |i: usize| fms[i].as_u64().unwrap() as u32;
            cpu_sig(n(0), n(1), n(2))
        }
        None => 0,
    }
}

/// The `vmm measure` arguments for a fixture case.
pub fn measure_args(case: &Value) -> Vec<String> {
    let mut a = vec![
        "measure".to_owned(),
        "--firmware".to_owned(),
        fixture_path(case["firmware"].as_str().unwrap())
            .display()
            .to_string(),
        "--vcpus".to_owned(),
        case["vcpus"].to_string(),
        "--vmm-type".to_owned(),
        case["vmm_type"].as_str().unwrap().to_owned(),
    ];
    if let Some(t) = case["vcpu_type"].as_str() {
        a.extend(["--vcpu-type".to_owned(), t.to_owned()]);
    }
    if let Some(sig) = case.get("vcpu_sig").and_then(Value::as_str) {
        a.extend(["--vcpu-sig".to_owned(), sig.to_owned()]);
    }
    if let Some(fms) = case.get("vcpu_fms").and_then(Value::as_array) {
        for (opt, v) in ["--vcpu-family", "--vcpu-model", "--vcpu-stepping"]
            .iter()
            .zip(fms)
        {
            a.extend([(*opt).to_owned(), v.to_string()]);
        }
    }
    match case["mode"].as_str().unwrap() {
        "snp" => a.extend([
            "--guest-features".to_owned(),
            case["guest_features"].as_str().unwrap().to_owned(),
        ]),
        "sev-es" => a.push("--sev-es".to_owned()),
        m => panic!("mode {m}"),
    }
    for opt in ["kernel", "initrd"] {
        if let Some(p) = case.get(opt).and_then(Value::as_str) {
            a.extend([format!("--{opt}"), fixture_path(p).display().to_string()]);
        }
    }
    if let Some(s) = case.get("append").and_then(Value::as_str) {
        a.extend(["--append".to_owned(), s.to_owned()]);
    }
    if let Some(h) = case.get("snp_ovmf_hash").and_then(Value::as_str) {
        a.extend(["--snp-ovmf-hash".to_owned(), h.to_owned()]);
    }
    a
}

/// Run the real `vmm` binary.
pub fn vmm<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("the vmm binary runs")
}

/// Run the real `vmm` binary, killing it and failing the test if it has not exited after
/// `limit` (for inputs that once made it hang).
#[track_caller]
pub fn vmm_within<I, S>(limit: std::time::Duration, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(&args);
    output_within(limit, &mut cmd)
}

/// Run `cmd`, killing it and failing the test if it has not exited after `limit`.
#[track_caller]
pub fn output_within(limit: std::time::Duration, cmd: &mut Command) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command runs");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for vmm") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A FIFO at `path` (nobody ever writes to it: opening it for reading blocks forever unless
/// the open does not block).
pub fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo runs");
    assert!(st.success(), "mkfifo {}", path.display());
}

/// Stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

/// Stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("stderr is UTF-8")
}

/// A fresh scratch directory under the target directory's tmp, removed when dropped (also when
/// the test fails: runs leave nothing behind).
pub fn scratch(name: &str) -> Scratch {
    let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("measure-{name}-"));
    Scratch(
        TempDir::new_with_prefix(&prefix)
            .unwrap_or_else(|e| panic!("scratch directory {}: {e}", prefix.display())),
    )
}

/// A test's scratch directory, used as the [`Path`] it is.
pub struct Scratch(TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.as_path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.as_path()
    }
}
