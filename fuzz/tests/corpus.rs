//! The committed corpora, replayed through their targets without instrumentation, so every
//! seed and every input that once crashed a target stays checked on the stable toolchain in the
//! normal suite (`cargo xtask test`), with no fuzzer installed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use vmsa_fuzz::TARGETS;
use vmsa_fuzz::seeds::seeds;

fn fuzz_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn names(dir: &Path, ext: Option<&str>) -> BTreeSet<String> {
    files(dir)
        .iter()
        .filter(|p| ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)))
        .filter_map(|p| p.file_stem()?.to_str().map(String::from))
        .collect()
}

#[test]
fn every_committed_input_passes_its_target() {
    let mut total = 0;
    for (name, target) in TARGETS {
        let inputs = files(&fuzz_dir().join("corpus").join(name));
        assert!(!inputs.is_empty(), "target {name} has no committed corpus");
        for input in &inputs {
            let data = std::fs::read(input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            println!("{name}: {}", input.display());
            target(&data);
        }
        println!("{name}: {} inputs", inputs.len());
        total += inputs.len();
    }
    println!(
        "{total} committed inputs replayed through {} targets",
        TARGETS.len()
    );
}

#[test]
fn targets_binaries_and_corpora_name_the_same_targets() {
    let targets: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        names(&fuzz_dir().join("fuzz_targets"), Some("rs")),
        targets,
        "fuzz_targets/*.rs"
    );
    let corpora: BTreeSet<String> = std::fs::read_dir(fuzz_dir().join("corpus"))
        .expect("fuzz/corpus")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(corpora, targets, "fuzz/corpus/*");
    let dicts = names(&fuzz_dir().join("dict"), Some("dict"));
    assert!(
        dicts.is_subset(&targets),
        "dictionaries without a target: {dicts:?}"
    );
}

#[test]
fn committed_seeds_are_the_workspaces_test_inputs() {
    let write = std::env::var_os("VMSA_FUZZ_WRITE_SEEDS").is_some();
    for seed in seeds() {
        let path = fuzz_dir().join("corpus").join(seed.target).join(&seed.name);
        if write {
            std::fs::create_dir_all(path.parent().expect("a corpus directory"))
                .expect("create the corpus directory");
            std::fs::write(&path, &seed.data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (VMSA_FUZZ_WRITE_SEEDS=1 cargo test -p vmsa-fuzz --test corpus writes it)",
                path.display()
            )
        });
        assert!(
            committed == seed.data,
            "{} differs from the seed the workspace makes now (VMSA_FUZZ_WRITE_SEEDS=1 rewrites it)",
            path.display()
        );
    }
}
