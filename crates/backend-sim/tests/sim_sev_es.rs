//! An SEV-ES guest on the simulator, through the VMM's path.
//!
//! It gets none of the exits only an SNP guest gets: KVM's `npf_interception` marks an access
//! private only for SNP (so no `KVM_EXIT_MEMORY_FAULT`), and `sev_es_validate_vmgexit` refuses a
//! GHCB page state change of a non-SNP guest with a GHCB error (no `KVM_HC_MAP_GPA_RANGE` exit).
//!
//! A kick interrupts a long guest action: the action used to run to its end under the guest
//! lock that `SimKick::kick` needs, so a watchdog could not stop a run inside a write of
//! millions of pages. Now it stops between pages, returns `VcpuExit::Interrupted`, and resumes
//! at the page it stopped at on the next run.
//!
//! Each test fails on the code before its fix.

use std::sync::Arc;

use backend_sim::guest::{GuestAction, GuestScript, PscTarget};
use backend_sim::host::{SimHost, SimVcpu, SimVm};
use backend_sim::{Machine, MachineConfig};
use vmsa_core::{Gpa, Platform, SnpPageType, VmKind};
use vmsa_host::{
    GuestStep, Hypervisor, Kick as _, LaunchUpdate, MemoryRegion, Observed, Vcpu as _, VcpuExit, Vm as _,
    VmSpec,
};

/// A launched one-vCPU SEV-ES VM on `host` with `memory` bytes of RAM (one measured page of
/// HLTs), and its vCPU.
fn launched_sev_es(host: &SimHost, memory: u64) -> (SimVm, SimVcpu) {
    let mut vm = host.create_vm(VmSpec::sev_es(0)).unwrap();
    vm.add_memory(MemoryRegion::ram(memory)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vm.launch_start(0).unwrap();
    vm.launch_update(LaunchUpdate {
        gpa: Gpa(0x1000),
        len: 0x1000,
        page_type: SnpPageType::Normal,
        data: Some(&[0xf4; 0x1000]),
    })
    .unwrap();
    vm.launch_update_vmsas().unwrap();
    vm.launch_finish().unwrap();
    (vm, vcpu)
}

/// Run `actions` on vCPU 0 of a launched one-vCPU SEV-ES VM through the VMM's path until the
/// script is done; returns the exits other than the done port's, and the steps recorded.
fn run_sev_es(actions: Vec<GuestAction>) -> (Vec<String>, Vec<GuestStep>) {
    let machine = Machine::new(MachineConfig::default());
    let host = SimHost::new(
        machine,
        GuestScript {
            name: "sev-es".into(),
            actions,
        },
    );
    let (vm, mut vcpu) = launched_sev_es(&host, 1 << 20);
    let mut exits = Vec::new();
    for _ in 0..16 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut { .. } => break,
            VcpuExit::Halt => exits.push("halt".to_owned()),
            other => {
                exits.push(format!("{other:?}"));
                break;
            }
        }
    }
    drop(vcpu);
    let report = vm.teardown();
    let Observed::Seen(guest) = report.guest else {
        panic!("the simulator reports the guest's steps");
    };
    (exits, guest.steps)
}

/// A C=0 write of an SEV-ES guest goes to its memory (there is no shared/private attribute to
/// disagree with): no memory fault exit, which the VMM could only answer with a
/// KVM_SET_MEMORY_ATTRIBUTES that KVM refuses for SEV-ES.
#[test]
fn a_shared_write_of_an_sev_es_guest_takes_no_memory_fault() {
    let (exits, steps) = run_sev_es(vec![
        GuestAction::Write {
            vcpu: 0,
            gpa: 0x4000,
            pages: 3,
            byte: 7,
            private: false,
        },
        GuestAction::Hlt { vcpu: 0 },
    ]);
    assert_eq!(exits, vec!["halt".to_owned()]);
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].error, None);
    assert_eq!(steps[0].detail, "3 pages ok");
}

/// A C=0 write and a C=0 read of an SEV-ES guest's page see the same plaintext; a C=1 read of
/// it decrypts it with the guest's key (the same frame, read through the key).
#[test]
fn sev_es_c0_and_c1_accesses_reach_the_same_frame() {
    let m = Machine::new(MachineConfig::default());
    let p = m.create_guest(VmKind::SevEs).unwrap();
    p.add_memslot(Gpa(0), 1 << 20).unwrap();
    p.launch_start(&vmsa_core::LaunchStart::SevEs { policy: 0 })
        .unwrap();
    p.guest_write(Gpa(0x2000), &[9; 4096], false).unwrap();
    assert_eq!(*p.guest_read(Gpa(0x2000), false).unwrap(), [9; 4096]);
    assert_ne!(*p.guest_read(Gpa(0x2000), true).unwrap(), [9; 4096]);
    p.guest_write(Gpa(0x3000), &[4; 4096], true).unwrap();
    assert_eq!(*p.guest_read(Gpa(0x3000), true).unwrap(), [4; 4096]);
    assert_ne!(*p.guest_read(Gpa(0x3000), false).unwrap(), [4; 4096]);
}

/// A GHCB page state change of an SEV-ES guest is refused by the host kernel with a GHCB
/// error (`GHCB_ERR_MISSING_INPUT`): the guest sees the failure and goes on; the VMM gets no
/// KVM_HC_MAP_GPA_RANGE exit.
#[test]
fn an_sev_es_page_state_change_is_a_ghcb_error_not_an_exit() {
    let (exits, steps) = run_sev_es(vec![
        GuestAction::PageState {
            vcpu: 0,
            gpa: 0x4000,
            pages: 2,
            to: PscTarget::Shared,
        },
        GuestAction::Hlt { vcpu: 0 },
    ]);
    assert_eq!(exits, vec!["halt".to_owned()]);
    assert_eq!(steps.len(), 2);
    let e = steps[0].error.as_deref().expect("the guest sees the refusal");
    assert!(e.contains("not an SNP guest") && e.contains("2/4"), "{e}");
    assert_eq!(steps[1].error, None);
}

const PAGES: u64 = 1 << 16;

fn guest_copies(machine: &Arc<Machine>) -> u64 {
    machine
        .cost_report()
        .ops
        .iter()
        .find(|r| r.op == "guest_copy")
        .map_or(0, |r| r.count)
}

#[test]
fn a_kick_interrupts_a_long_write_which_resumes_where_it_stopped() {
    let machine = Machine::new(MachineConfig::default());
    let script = GuestScript {
        name: "long-write".into(),
        actions: vec![
            GuestAction::Write {
                vcpu: 0,
                gpa: 1 << 30,
                pages: PAGES,
                byte: 3,
                private: true,
            },
            GuestAction::Hlt { vcpu: 0 },
        ],
    };
    let host = SimHost::new(machine.clone(), script);
    let (vm, mut vcpu) = launched_sev_es(&host, 2 << 30);
    let before = guest_copies(&machine);

    // The kicker waits until the write has begun (its first page is copied), then kicks: the
    // run must stop inside the write.
    let kick = vcpu.kicker();
    let watcher = machine.clone();
    let kicker = std::thread::spawn(move || {
        while guest_copies(&watcher) == before {
            std::thread::yield_now();
        }
        kick.kick();
    });
    let first = vcpu.run().unwrap();
    let copied = guest_copies(&machine) - before;
    kicker.join().unwrap();
    assert!(
        matches!(first, VcpuExit::Interrupted),
        "the kick interrupts the write: {first:?}"
    );
    assert!(
        copied > 0 && copied < PAGES,
        "stopped inside the write: {copied} of {PAGES} pages"
    );

    // The next runs resume the write at the page it stopped at and finish it.
    let mut exits = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut { .. } => break,
            VcpuExit::Halt => exits.push("halt"),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(exits, vec!["halt"], "the kick was taken once");
    assert_eq!(guest_copies(&machine) - before, PAGES, "each page written once");
    drop(vcpu);
    let report = vm.teardown();
    let Observed::Seen(guest) = report.guest else {
        panic!("the simulator reports the guest's steps");
    };
    let steps: Vec<_> = guest
        .steps
        .iter()
        .map(|s| (s.action.clone(), s.error.clone(), s.detail.clone()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("write".to_owned(), None, format!("{PAGES} pages ok")),
            ("hlt".to_owned(), None, "halted".to_owned()),
        ]
    );
}

/// A kick before the run (no action started) still interrupts the run at once, once.
#[test]
fn a_kick_before_the_run_interrupts_it_once() {
    let machine = Machine::new(MachineConfig::default());
    let script = GuestScript {
        name: "hlt".into(),
        actions: vec![GuestAction::Hlt { vcpu: 0 }],
    };
    let host = SimHost::new(machine, script);
    let (_vm, mut vcpu) = launched_sev_es(&host, 1 << 20);
    vcpu.kicker().kick();
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Interrupted));
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Halt));
}
