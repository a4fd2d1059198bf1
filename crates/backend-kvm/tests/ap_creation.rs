//! The guest-driven AP-creation scenario on real KVM (VMSA-image mode).

mod common;

use backend_kvm::runner::{self, GuestProgram, ModeChoice, RunConfig};

#[test]
fn four_vcpus_dbg() {
    if !common::kvm_or_skip("four_vcpus") {
        return;
    }
    let cfg = RunConfig {
        mode: ModeChoice::VmsaImage,
        ..RunConfig::ap_creation(4)
    };
    let r = runner::run(&cfg).unwrap();
    println!("{r}");
    println!("{}", serde_json::to_string_pretty(&r.vcpu_records).unwrap());
    assert!(r.completed);
    let _ = GuestProgram::ApCreation { recreate: true };
}
