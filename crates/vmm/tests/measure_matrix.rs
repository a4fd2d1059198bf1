//! `vmm measure` against sev-snp-measure 0.0.13: every fixture case's digest, the
//! `--dump-vmsa` files byte for byte, the `--json` document, and the kernel hash tables.
//! Expected values come only from `tests/fixtures/gen_measure.py` (run `cargo xtask fixtures`).

mod measure_support;

use std::collections::BTreeSet;
use std::sync::Mutex;

use measure_support::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use vmm::measure::hashes::SevHashes;

/// Run `f` over `items` on all cores, collecting failure messages.
fn parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<(), String> + Sync) -> Vec<String> {
    let failures = Mutex::new(Vec::new());
    let next = Mutex::new(0usize);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(item) {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

fn cases() -> &'static [Value] {
    fixtures()["cases"].as_array().expect("cases")
}

#[test]
fn the_matrix_covers_what_the_issue_asks() {
    let cases = cases();
    let set = |key: &str| -> BTreeSet<String> { cases.iter().map(|c| c[key].to_string()).collect() };
    let types = set("vcpu_type");
    for t in vmm::measure::vcpu_types::VCPU_TYPES {
        assert!(
            types.contains(&format!("\"{}\"", t.name)),
            "no case for {}",
            t.name
        );
    }
    assert_eq!(set("vmm_type").len(), 3);
    assert_eq!(set("mode").len(), 2);
    for n in ["1", "2", "64", "512"] {
        assert!(set("vcpus").contains(n), "no case with {n} vCPUs");
    }
    let fws = set("firmware");
    assert!(
        fws.contains(&format!("\"{DEBIAN_OVMF}\"")) && fws.contains(&format!("\"{DEBIAN_OVMF_CODE_4M}\""))
    );
    assert!(set("guest_features").len() > 3);
    // A model given by signature and by family/model/stepping, in both modes.
    for key in ["vcpu_sig", "vcpu_fms"] {
        for mode in ["snp", "sev-es"] {
            assert!(
                cases.iter().any(|c| c.get(key).is_some() && c["mode"] == mode),
                "no {mode} case with {key}"
            );
        }
    }
    assert!(
        cases
            .iter()
            .any(|c| c.get("kernel").is_some() && c["mode"] == "snp")
    );
    assert!(
        cases
            .iter()
            .any(|c| c.get("kernel").is_some() && c["mode"] == "sev-es")
    );
}

#[test]
fn every_digest_matches_sev_snp_measure() {
    // The dump cases are checked (digest included) by `dumped_vmsas_are_byte_identical`.
    let plain: Vec<&Value> = cases().iter().filter(|c| c["dump"] != true).collect();
    let failures = parallel(&plain, |c| {
        let out = vmm(measure_args(c));
        let text = stdout(&out);
        let last = text.lines().last().unwrap_or_default();
        let want = c["digest"].as_str().unwrap();
        if out.status.code() != Some(0) || last != want {
            return Err(format!(
                "case {} {:?}: exit {:?}, last line {last:?}, sev-snp-measure {want}; stderr {}",
                c["id"],
                measure_args(c),
                out.status.code(),
                stderr(&out)
            ));
        }
        if text
            .lines()
            .any(|l| l.len() == want.len() && l.chars().all(|ch| ch.is_ascii_hexdigit()) && l != want)
        {
            return Err(format!("case {}: another digest-like line", c["id"]));
        }
        Ok(())
    });
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n")
    );
}

/// `--ovmf-hash-only` prints the OVMF hash sev-snp-measure prints (`--mode snp:ovmf-hash`) for
/// each firmware, and `--snp-ovmf-hash` continues a launch from a given hash as
/// sev-snp-measure's does: the firmware's own hash gives the whole launch's digest, and a
/// hash of no firmware (whose pages then are not hashed at all) gives sev-snp-measure's digest
/// for it, with each VMM type and a direct kernel boot. The JSON names the given hash.
#[test]
fn ovmf_hashes_and_launches_from_them_match_sev_snp_measure() {
    let hashes = fixtures()["ovmf_hashes"].as_array().unwrap();
    assert_eq!(hashes.len(), 3, "both Debian firmwares and the synthetic one");
    for h in hashes {
        let fw = fixture_path(h["firmware"].as_str().unwrap());
        let fw = fw.to_str().unwrap();
        let out = vmm(["measure", "--firmware", fw, "--ovmf-hash-only"]);
        assert_eq!(out.status.code(), Some(0), "{fw}: {}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.lines().last(), h["hash"].as_str(), "{fw}: {text}");
        assert!(text.contains("ovmf hash (sha384):"), "{text}");
        let out = vmm(["measure", "--firmware", fw, "--ovmf-hash-only", "--json"]);
        let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(
            (&doc["ovmf_hash"], &doc["mode"]),
            (&h["hash"], &Value::from("snp:ovmf-hash"))
        );
    }
    let from_hash = fixtures()["ovmf_hash_cases"].as_array().unwrap();
    let full = |c: &Value| {
        cases()
            .iter()
            .find(|f| {
                [
                    "firmware",
                    "mode",
                    "vcpus",
                    "vcpu_type",
                    "vmm_type",
                    "guest_features",
                ]
                .iter()
                .all(|k| f[k] == c[k])
                    && f.get("kernel").is_none()
            })
            .map(|f| f["digest"].clone())
    };
    assert_eq!(
        full(&from_hash[0]),
        Some(from_hash[0]["digest"].clone()),
        "the firmware's own hash gives the launch's digest"
    );
    let failures = parallel(from_hash, |c| {
        let mut args = measure_args(c);
        args.push("--json".to_owned());
        let out = vmm(&args);
        let doc: Value =
            serde_json::from_str(&stdout(&out)).map_err(|e| format!("{args:?}: {e}: {}", stderr(&out)))?;
        if doc["digest"] != c["digest"] || doc["inputs"]["snp_ovmf_hash"] != c["snp_ovmf_hash"] {
            return Err(format!(
                "case {}: {doc}, sev-snp-measure {}",
                c["id"], c["digest"]
            ));
        }
        Ok(())
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dumped_vmsas_are_byte_identical() {
    let dumps: Vec<&Value> = cases().iter().filter(|c| c["dump"] == true).collect();
    assert!(dumps.len() >= 10, "the fixtures dump too few cases");
    let root = scratch("dumps");
    let failures = parallel(&dumps, |c| {
        let id = c["id"].as_str().unwrap();
        let dir = root.join(id);
        let mut args = measure_args(c);
        args.extend(["--dump-vmsa".to_owned(), dir.display().to_string()]);
        let out = vmm(&args);
        let want_digest = c["digest"].as_str().unwrap();
        if out.status.code() != Some(0) || stdout(&out).lines().last() != Some(want_digest) {
            return Err(format!(
                "case {id}: exit {:?}, stdout {:?}, sev-snp-measure {want_digest}; stderr {}",
                out.status.code(),
                stdout(&out),
                stderr(&out)
            ));
        }
        let want_dir = fixture_dir().join("dumps").join(id);
        let names = |d: &std::path::Path| -> BTreeSet<String> {
            std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        };
        let (have, want) = (names(&dir), names(&want_dir));
        if have != want {
            return Err(format!(
                "case {id}: files {have:?}, sev-snp-measure wrote {want:?}"
            ));
        }
        for name in &want {
            let a = std::fs::read(dir.join(name)).unwrap();
            let b = std::fs::read(want_dir.join(name)).unwrap();
            if a != b {
                let at = a.iter().zip(&b).position(|(x, y)| x != y);
                return Err(format!(
                    "case {id}: {name} differs (first at {at:?}, lengths {} {})",
                    a.len(),
                    b.len()
                ));
            }
        }
        Ok(())
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing but the requested directories was created.
    let mut left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    let mut want: Vec<String> = dumps
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    want.sort();
    assert_eq!(left, want);
}

#[test]
fn json_is_one_document_with_digest_mode_and_inputs() {
    let pick = |mode: &str, kernel: bool| {
        cases()
            .iter()
            .find(|c| c["mode"] == mode && c.get("kernel").is_some() == kernel && c["vmm_type"] == "ec2")
            .unwrap()
    };
    for c in [
        pick("snp", false),
        pick("sev-es", false),
        pick("snp", true),
        pick("sev-es", true),
    ] {
        let mut args = measure_args(c);
        args.push("--json".to_owned());
        let out = vmm(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.lines().count(), 1, "one JSON line: {text}");
        let doc: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(doc["digest"], c["digest"]);
        assert_eq!(doc["mode"], c["mode"]);
        let alg = if c["mode"] == "snp" { "sha384" } else { "sha256" };
        assert_eq!(doc["algorithm"], alg);
        let inputs = &doc["inputs"];
        assert_eq!(inputs["vcpus"], c["vcpus"]);
        assert_eq!(inputs["vmm_type"], c["vmm_type"]);
        assert_eq!(inputs["vcpu_type"], c["vcpu_type"]);
        assert_eq!(
            inputs["firmware"].as_str().unwrap(),
            fixture_path(c["firmware"].as_str().unwrap())
                .display()
                .to_string()
        );
        if c["mode"] == "snp" {
            assert_eq!(inputs["guest_features"], c["guest_features"]);
        }
        assert_eq!(inputs["append"], c.get("append").cloned().unwrap_or(Value::Null));
        assert_eq!(doc["pages"]["vmsa"], c["vcpus"]);
        // EC2 ignores a vCPU model, and the document says so when one was given.
        let warnings = doc["warnings"].as_array().unwrap();
        match c["vcpu_type"].as_str() {
            Some(t) => {
                assert_eq!(warnings.len(), 1, "{warnings:?}");
                let w = warnings[0].as_str().unwrap();
                assert!(w.contains(t) && w.contains("ignored"), "{w}");
            }
            None => assert!(warnings.is_empty(), "{warnings:?}"),
        }
    }
}

/// `--output-format base64` writes the digest as sev-snp-measure's `--output-format base64`
/// does, in the text's last line and in the JSON document (which names the format); hex stays
/// the default. The other forms of `vmm measure` refuse the option instead of ignoring it.
#[test]
fn base64_digests_match_sev_snp_measure() {
    let picked = fixture_cases(|c| c.get("digest_base64").is_some());
    assert_eq!(picked.len(), 6, "one launch per mode and VMM type");
    for c in picked {
        let want = c["digest_base64"].as_str().unwrap();
        let mut args = measure_args(c);
        args.extend(["--output-format".to_owned(), "base64".to_owned()]);
        let out = vmm(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out).lines().last(), Some(want), "case {}", c["id"]);
        args.push("--json".to_owned());
        let doc: Value = serde_json::from_str(&stdout(&vmm(&args))).unwrap();
        assert_eq!(
            (doc["digest"].as_str(), doc["digest_format"].as_str()),
            (Some(want), Some("base64"))
        );
        let mut hex = measure_args(c);
        hex.extend([
            "--output-format".to_owned(),
            "hex".to_owned(),
            "--json".to_owned(),
        ]);
        let doc: Value = serde_json::from_str(&stdout(&vmm(&hex))).unwrap();
        assert_eq!(
            (&doc["digest"], doc["digest_format"].as_str()),
            (&c["digest"], Some("hex"))
        );
    }
    let fw = fixture_path(cases()[0]["firmware"].as_str().unwrap());
    let fw = fw.to_str().unwrap();
    for form in [["--firmware", fw, "--ovmf-hash-only"], ["--igvm", fw, "--json"]] {
        let mut args = vec!["measure", "--output-format", "base64"];
        args.extend(form);
        refused_with(&args, "--output-format", "cannot be used with");
    }
    refused_with(
        &[
            "measure",
            "--firmware",
            fw,
            "--vcpus",
            "1",
            "--vcpu-type",
            "EPYC-v4",
            "--output-format",
            "b64",
        ],
        "--output-format",
        "'b64'",
    );
}

#[test]
fn snp_with_a_firmware_without_metadata_warns_on_stderr_but_matches() {
    let c = cases()
        .iter()
        .find(|c| c["firmware"] == DEBIAN_OVMF_CODE_4M && c["mode"] == "snp")
        .unwrap();
    let out = vmm(measure_args(c));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out).lines().last().unwrap(),
        c["digest"].as_str().unwrap()
    );
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("warning") && err.contains("no SEV metadata"),
        "{err}"
    );
}

#[test]
fn hash_tables_match_sev_snp_measures_sev_hashes() {
    let tables = fixtures()["hash_tables"].as_array().unwrap();
    assert!(!tables.is_empty());
    for t in tables {
        let path = |k: &str| t[k].as_str().map(fixture_path);
        let h = SevHashes::from_files(
            &path("kernel").unwrap(),
            path("initrd").as_deref(),
            t["append"].as_str(),
        )
        .unwrap();
        assert_eq!(hex(&h.table()), t["table"].as_str().unwrap(), "{t}");
        for (off, sha) in t["pages"].as_object().unwrap() {
            let page = h.page(off.parse().unwrap()).unwrap();
            assert_eq!(
                hex(&Sha256::digest(&page[..])),
                sha.as_str().unwrap(),
                "{t} @{off}"
            );
        }
    }
}
