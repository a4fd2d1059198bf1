//! A kick interrupts a long guest action: the action used to run to its end under the guest
//! lock that `SimKick::kick` needs, so a watchdog could not stop a run inside a write of
//! millions of pages. Now it stops between pages, returns `VcpuExit::Interrupted`, and resumes
//! at the page it stopped at on the next run. Fails on the code before the fix.

use std::sync::Arc;

use backend_sim::guest::{GuestAction, GuestScript};
use backend_sim::host::SimHost;
use backend_sim::{Machine, MachineConfig};
use vmsa_core::{Gpa, SnpPageType};
use vmsa_host::{
    Hypervisor, Kick as _, LaunchUpdate, MemoryRegion, Observed, Vcpu as _, VcpuExit, Vm as _, VmSpec,
};

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
    let mut vm = host.create_vm(VmSpec::sev_es(0)).unwrap();
    vm.add_memory(MemoryRegion::ram(2 << 30)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
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
    let mut vm = host.create_vm(VmSpec::sev_es(0)).unwrap();
    vm.add_memory(MemoryRegion::ram(1 << 20)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
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
    vcpu.kicker().kick();
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Interrupted));
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Halt));
}
