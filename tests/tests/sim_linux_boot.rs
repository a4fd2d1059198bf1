//! `builtin:linux-boot` and `builtin:linux-boot-4k` end to end at small sizes, through the
//! VMM's one flow: when the guest's run ends every RAM page is validated but the bounce
//! buffer, which is shared with its private frames released; every AP runs on the VMSA it was
//! created with; the simulator's bookkeeping stays within the hardware RMP's 16 bytes per
//! frame; and the teardown gives every frame back.

use backend_sim::guest::{GuestScript, LinuxBootLayout, linux_boot_vmsa_gpa};
use backend_sim::{Footprint, GuestCensus, MachineConfig};
use scenario_tests::{FIRMWARE_GPA, FIRMWARE_PAGES, SimRun, sim_boot_inspecting};
use vmm::run::flow::RunEnd;
use vmsa_core::{Event, Gfn, Gpa, PAGE_SIZE, VcpuId, VmsaState};

/// What the machine looked like as the guest's run ended.
#[derive(Debug, Default)]
struct AtRunEnd {
    /// All of RAM.
    ram: GuestCensus,
    /// RAM but the bounce buffer.
    kept: GuestCensus,
    /// The bounce buffer.
    bounce: GuestCensus,
    footprint: Footprint,
}

/// Boot `vcpus` vCPUs with `memory` bytes of RAM from 0 (2 MiB pages and folios if `large`).
fn linux_boot(vcpus: u32, memory: u64, large: bool) -> (SimRun, LinuxBootLayout, AtRunEnd) {
    let launched = (FIRMWARE_GPA, FIRMWARE_GPA + FIRMWARE_PAGES * PAGE_SIZE);
    let layout = LinuxBootLayout::new(vcpus, vec![(0, memory)], vec![launched]).expect("enough RAM");
    let script = GuestScript::linux_boot(vcpus, &layout, large);
    let config = MachineConfig {
        gmem_2m_folios: large,
        ..MachineConfig::default()
    };
    let (b0, b1) = (Gfn(layout.bounce.0 / PAGE_SIZE), Gfn(layout.bounce.1 / PAGE_SIZE));
    let top = Gfn(memory / PAGE_SIZE);
    let mut seen = AtRunEnd::default();
    let run = sim_boot_inspecting(config, vcpus, memory, script, &mut |m| {
        let asid = m.guests()[0];
        let census = |a, b| m.guest_census(asid, a, b).expect("the guest exists");
        let (low, high) = (census(Gfn(0), b0), census(b1, top));
        seen = AtRunEnd {
            ram: census(Gfn(0), top),
            kept: GuestCensus {
                frames: low.frames + high.frames,
                private: low.private + high.private,
                backed: low.backed + high.backed,
                validated: low.validated + high.validated,
            },
            bounce: census(b0, b1),
            footprint: m.footprint(),
        };
    });
    (run, layout, seen)
}

fn check(vcpus: u32, memory: u64, large: bool) {
    let what = format!("{vcpus} vCPUs, {} MiB, large {large}", memory >> 20);
    let (r, layout, seen) = linux_boot(vcpus, memory, large);
    let g = r.guest();
    assert_eq!(
        g.failures().count(),
        0,
        "{what}: {:?}",
        g.failures().collect::<Vec<_>>()
    );
    let run = r.report.run.as_ref().expect("the guest ran");
    assert_eq!(run.end, RunEnd::Done, "{what}");

    // Every RAM page but the bounce buffer private, backed and validated (the launched
    // firmware pages by the launch, the rest by the guest).
    let frames = memory / PAGE_SIZE;
    let bounce_frames = (layout.bounce.1 - layout.bounce.0) / PAGE_SIZE;
    assert!(bounce_frames > 0, "{what}");
    assert_eq!(seen.ram.frames, frames, "{what}");
    let kept = frames - bounce_frames;
    assert_eq!(
        (seen.kept.private, seen.kept.backed, seen.kept.validated),
        (kept, kept, kept),
        "{what}: RAM outside the bounce buffer: {:?}",
        seen.kept
    );
    // The bounce buffer shared: attribute flipped, private frames released.
    assert_eq!(
        (seen.bounce.private, seen.bounce.backed, seen.bounce.validated),
        (0, 0, 0),
        "{what}: the bounce buffer: {:?}",
        seen.bounce
    );

    // Every AP created through the GHCB from its own VMSA, and running on it.
    assert_eq!((g.ap_requests, g.ap_refused), (u64::from(vcpus) - 1, 0), "{what}");
    for i in 1..vcpus {
        let gpa = Gpa(linux_boot_vmsa_gpa(i));
        assert!(
            r.events().iter().any(|e| matches!(e,
                Event::Transition { vcpu, to: VmsaState::GuestOwned(g), .. } if *vcpu == VcpuId(i) && *g == gpa)),
            "{what}: AP {i} owns the VMSA at {gpa}"
        );
        assert!(
            g.steps
                .iter()
                .any(|s| s.vcpu == i && s.action == "run" && s.detail == "running"),
            "{what}: AP {i} runs"
        );
    }

    // Bookkeeping within the hardware RMP's 16 bytes per 4 KiB frame.
    let f = &seen.footprint;
    assert!(f.allocated_frames as u64 >= kept, "{what}: {f:?}");
    assert!(f.rmp_bytes_per_frame() <= 16.0, "{what}: RMP {f:?}");
    assert!(f.bookkeeping_per_frame() <= 16.0, "{what}: bookkeeping {f:?}");
    if large {
        // 2 MiB entries describe the guest: 4 KiB ones only in the first 2 MiB (which holds the
        // launched pages) and the 2 MiB region the AP VMSAs smashed.
        assert!(f.rmp_entries as u64 <= 2 * 512 + frames / 512, "{what}: {f:?}");
        assert!(f.bookkeeping_per_frame() <= 2.0, "{what}: {f:?}");
    } else {
        assert!(
            f.rmp_entries as u64 >= kept,
            "{what}: every page its own entry: {f:?}"
        );
    }
    // Pages never written cost no contents, and neither do pages of one repeated byte (the
    // launched image is HLT, 0xf4, over and over): only the BSP's VMSA and the VMSAs the guest
    // wrote for its APs hold any.
    assert_eq!(f.backed_frames as u64, u64::from(vcpus), "{what}: {f:?}");

    // Torn down: every frame back, nothing leaked, no RMP fault, nothing freed while assigned.
    let m = &r.machine;
    let stats = m.stats();
    let t = &r.report.host.teardown;
    assert_eq!(m.allocated_frames(), 0, "{what}");
    assert!(m.leaked_frames().is_empty(), "{what}");
    assert_eq!(t.guest_frames_leaked.seen(), Some(&0), "{what}");
    assert_eq!(t.guest_frames_released.seen(), Some(&kept), "{what}");
    assert_eq!(stats.rmp_faults, 0, "{what}");
    assert_eq!(
        (stats.freed_unflushed, stats.freed_while_assigned),
        (0, 0),
        "{what}"
    );
    assert!(
        !r.events().iter().any(|e| matches!(e, Event::Leaked { .. })),
        "{what}"
    );
}

#[test]
fn linux_boot_4k_validates_all_ram_shares_the_bounce_buffer_and_starts_every_ap() {
    check(1, 64 << 20, false);
    check(4, 128 << 20, false);
}

#[test]
fn linux_boot_with_2m_pages_does_the_same_with_a_handful_of_rmp_entries() {
    check(1, 64 << 20, true);
    check(8, 256 << 20, true);
}

/// The 2 MiB boot takes 2 MiB RMP entries where it validates 2 MiB pages, and the AP VMSAs,
/// which are 4 KiB pages inside a 2 MiB page, cost one PSMASH (the host's answer to the
/// RMPADJUST's size-mismatch fault); the 4 KiB boot has neither.
#[test]
fn large_pages_are_smashed_only_where_a_vmsa_needs_a_4k_entry() {
    let (r, _, _) = linux_boot(4, 64 << 20, true);
    let s = r.machine.stats();
    assert_eq!(s.psmash_on_fault, 1, "the three AP VMSAs share one 2 MiB region");
    let costs = r.machine.cost_report();
    let count = |op| costs.op(op).map_or(0, |row| row.count);
    assert!(count(backend_sim::CostOp::Pvalidate2M) > 0);
    assert!(
        count(backend_sim::CostOp::Rmpupdate2M) > 0,
        "the bounce buffer and teardown"
    );
    let (r, _, _) = linux_boot(4, 64 << 20, false);
    let s = r.machine.stats();
    let costs = r.machine.cost_report();
    assert_eq!(s.psmash_on_fault, 0);
    assert!(costs.op(backend_sim::CostOp::Pvalidate2M).is_none());
}
