//! Running and tearing down VMs on KVM through the VMM's flow leaves no file descriptor, mapping
//! or host page behind. (Alone in its test binary: it counts the whole process's fds and
//! mappings.)

use std::time::Duration;

use backend_kvm::guest::builtin::GuestProgram;
use scenario_tests::kvm;
use vmm::run::flow::RunEnd;
use vmsa_host::Observed;

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

fn gmem_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().filter(|l| l.contains("anon_inode:")).count())
        .unwrap_or(0)
}

#[test]
fn runs_leak_no_fds_mappings_or_pages() {
    let Some(host) = kvm::image_host("runs_leak_no_fds_mappings_or_pages") else {
        return;
    };
    let program = GuestProgram::ApCreation { recreate: true };
    let run = || kvm::run(&host, &program, 8, kvm::memory_for(8), Duration::from_secs(60));
    // Warm up (the signal handler, thread stacks the allocator keeps, the event loop, lazy
    // statics).
    assert_eq!(*run().end(), RunEnd::Done);
    let (fd0, maps0, gmem0) = (fds(), maps(), gmem_maps());
    assert_eq!(gmem0, 0, "no guest_memfd mapping survives a run");
    assert_eq!(kvm::kvm_fds(), 0, "no KVM fd survives a run");
    for _ in 0..3 {
        let r = run();
        assert_eq!(*r.end(), RunEnd::Done);
        let t = &r.report.host.teardown;
        assert_eq!(
            (&t.vmsas_leaked, &t.frames_still_allocated),
            (&Observed::Seen(0), &Observed::Seen(0))
        );
    }
    let (fd1, maps1, gmem1) = (fds(), maps(), gmem_maps());
    assert_eq!(fd1, fd0, "file descriptors before/after three runs");
    assert_eq!(gmem1, 0);
    assert_eq!(kvm::kvm_fds(), 0);
    // The allocator may keep or return an arena; guest memory (16 MiB each) must not stay.
    assert!(maps1 <= maps0 + 2, "mappings grew from {maps0} to {maps1}");
}
