//! Shared helpers for the scenario tests on real `/dev/kvm` (tests/tests/kvm_*.rs): backend-kvm's
//! VMSA-image host driven through the VMM's one flow, and what its report shows.
#![cfg(target_arch = "x86_64")]

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use backend_kvm::guest::builtin::GuestProgram;
use backend_kvm::host::KvmImageHost;
use vmm::run::flow::{self, FlowReport, Launch, RunEnd, VcpuExits};
use vmm::run::progress::Progress;
use vmsa_core::{Event, History, Op, SNP_POLICY_RSVD_MBO, StateKind};
use vmsa_host::{GuestActivity, GuestStep};

pub use backend_kvm::testing::kvm_fds;

/// Whether /dev/kvm can be used; prints why not when it cannot (the only reason to skip).
///
/// Takes the [`turn`] while its fd is open, as every helper here that opens a KVM fd does: a
/// test that counts the process's KVM fds must not see another test thread's (under
/// `cargo test` the tests of a binary share one process).
pub fn kvm_or_skip(test: &str) -> bool {
    let _turn = turn();
    backend_kvm::testing::kvm_or_skip(test)
}

/// backend-kvm's VMSA-image host (forced, whatever the probe would pick), or `None` with the
/// reason printed when this machine cannot run it.
pub fn image_host(test: &str) -> Option<KvmImageHost> {
    if !kvm_or_skip(test) {
        return None;
    }
    // The probe opens /dev/kvm and tries VM types: KVM fds, so in turn (see `kvm_or_skip`).
    let probe = {
        let _turn = turn();
        backend_kvm::probe()
    };
    match KvmImageHost::new(&probe, "asked for by the test") {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            None
        }
    }
}

/// Tests that count the process's KVM fds or mappings take turns, and so does every helper
/// here that opens one. Not reentrant: never call those helpers while holding it.
pub fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// The guest memory a run of `vcpus` vCPUs gets: 16 MiB, or what the program needs.
pub fn memory_for(vcpus: u32) -> u64 {
    GuestProgram::min_memory(vcpus).max(16 << 20)
}

/// A guest's whole life on KVM through the VMM's flow.
#[derive(Debug)]
pub struct KvmRun {
    /// What the flow reported.
    pub report: FlowReport,
    /// From creating the VM to the end of teardown.
    pub elapsed: Duration,
}

impl KvmRun {
    /// How the run ended.
    pub fn end(&self) -> &RunEnd {
        &self.report.run.as_ref().expect("the launch finished").end
    }

    /// Each vCPU thread's exits, by APIC ID.
    pub fn exits(&self) -> &[VcpuExits] {
        &self.report.run.as_ref().expect("the launch finished").vcpus
    }

    /// What the guest did (every GHCB request, in order).
    pub fn guest(&self) -> &GuestActivity {
        self.report
            .host
            .guest
            .seen()
            .expect("VMSA-image mode sees the guest's requests")
    }

    /// vmsa-core's events.
    pub fn events(&self) -> &[Event] {
        self.report
            .host
            .events
            .seen()
            .expect("VMSA-image mode sees the ownership events")
    }

    /// Every vCPU's VMSA ownership history, by vCPU.
    pub fn histories(&self) -> Vec<History> {
        vmsa_core::histories(self.events())
    }

    /// vCPU `vcpu`'s ownership transitions as (operation, state reached).
    pub fn ops(&self, vcpu: usize) -> Vec<(Op, StateKind)> {
        self.histories()[vcpu]
            .transitions
            .iter()
            .map(|t| (t.op, t.to.kind()))
            .collect()
    }
}

/// The `(sw_exit_info_1, sw_exit_info_2)` a guest step's request got: `(0, 0)` when it was
/// accepted, else the codes its refusal names (`"... (sw_exit_info 2/5)"`).
pub fn sw_exit_info(step: &GuestStep) -> (u64, u64) {
    let Some(error) = &step.error else {
        return (0, 0);
    };
    let codes = error
        .rsplit_once("(sw_exit_info ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .and_then(|c| c.split_once('/'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    codes.unwrap_or_else(|| panic!("step {} names no sw_exit_info codes: {error}", step.index))
}

/// Run `program` on `vcpus` vCPUs and `memory` bytes of guest_memfd memory from GPA 0 on `host`
/// through the VMM's flow (create, launch, one thread per vCPU under `watchdog`, teardown).
pub fn run(
    host: &KvmImageHost,
    program: &GuestProgram,
    vcpus: u32,
    memory: u64,
    watchdog: Duration,
) -> KvmRun {
    let image = program.image(vcpus).expect("the built-in guest assembles");
    let launch = Launch::snp_image(memory, SNP_POLICY_RSVD_MBO, image.gpa, &image.bytes, &image.vmsas);
    let t0 = Instant::now();
    let report =
        flow::run(host, &launch, watchdog, &Progress::hidden(), &mut |_| {}).expect("KVM creates the VM");
    KvmRun {
        report,
        elapsed: t0.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The teardown tests assert `kvm_fds() == 0`: that would hold for a count that sees
    /// nothing, so it must see a VM's fds, and not a file with "kvm" in its path.
    #[test]
    fn kvm_fds_counts_kvm_s_objects_and_only_them() {
        if !kvm_or_skip("kvm_fds_counts_kvm_s_objects_and_only_them") {
            return;
        }
        let _turn = turn();
        // Removed when dropped, also when an assertion fails.
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix(std::env::temp_dir().join("kvm-named-")).unwrap();
        let dir = dir.as_path();
        let file = std::fs::File::create(dir.join("kvm-vm")).unwrap();
        assert_eq!(kvm_fds(), 0, "a file under {} is no KVM object", dir.display());
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        assert_eq!(
            kvm_fds(),
            3,
            "/dev/kvm, anon_inode:kvm-vm and anon_inode:kvm-vcpu:0"
        );
        drop((vcpu, vm, kvm));
        assert_eq!(kvm_fds(), 0);
        drop(file);
    }
}
