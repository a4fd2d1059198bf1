//! Running and tearing down VMs leaves no file descriptor, mapping or host page behind.
//! (Alone in its test binary: it counts the whole process's fds and mappings.)

mod common;

use backend_kvm::runner;

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// KVM objects (`anon_inode:kvm-vm`, `kvm-vcpu:N`, `[kvm-gmem]`) among the open fds.
fn kvm_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|p| p.to_string_lossy().contains("kvm"))
                .count()
        })
        .unwrap_or(0)
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
    if !common::kvm_or_skip("runs_leak_no_fds_mappings_or_pages") {
        return;
    }
    let cfg = common::vmsa_image(8);
    // Warm up (the signal handler, thread stacks the allocator keeps, lazy statics).
    assert!(runner::run(&cfg).unwrap().completed);
    let (fd0, maps0, gmem0) = (fds(), maps(), gmem_maps());
    assert_eq!(gmem0, 0, "no guest_memfd mapping survives a run");
    assert_eq!(kvm_fds(), 0, "no KVM fd survives a run");
    for _ in 0..3 {
        let r = runner::run(&cfg).unwrap();
        assert!(r.completed, "{r}");
        assert_eq!((r.teardown.leaked, r.teardown.host_pages_live), (0, 0));
    }
    let (fd1, maps1, gmem1) = (fds(), maps(), gmem_maps());
    assert_eq!(fd1, fd0, "file descriptors before/after three runs");
    assert_eq!(gmem1, 0);
    assert_eq!(kvm_fds(), 0);
    // The allocator may keep or return an arena; guest memory (16 MiB each) must not stay.
    assert!(maps1 <= maps0 + 2, "mappings grew from {maps0} to {maps1}");
}
