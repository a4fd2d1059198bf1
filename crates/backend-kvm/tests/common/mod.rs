//! Shared helpers of the real-KVM tests.
#![allow(dead_code)]

use backend_kvm::runner::{ModeChoice, RunConfig};

/// Whether /dev/kvm can be used; prints why not when it cannot (the only reason to skip).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// The AP-creation scenario with `vcpus` vCPUs, forced into VMSA-image mode.
pub fn vmsa_image(vcpus: u32) -> RunConfig {
    RunConfig {
        mode: ModeChoice::VmsaImage,
        ..RunConfig::ap_creation(vcpus)
    }
}
