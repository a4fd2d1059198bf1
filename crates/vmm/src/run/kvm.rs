//! `vmm run --backend kvm`: real vCPUs on `/dev/kvm` through backend-kvm, which picks SEV-SNP
//! where the host has it and VMSA-image mode (vCPUs started from VMSA register images, guest
//! VMSAs in guest_memfd) elsewhere, and says which and why.
//!
//! The vCPU threads belong to backend-kvm; the VMM's control loop waits for them on an eventfd
//! (event-manager) with a ticking timerfd that keeps the progress display alive.

use std::os::fd::AsRawFd;
use std::time::Duration;

use backend_kvm::runner::GuestProgram;
use backend_kvm::{ModeChoice, RunConfig};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;
use vmsa_core::LaunchState;

use super::flow::errno;
use super::history::Ledger;
use super::progress::Progress;
use super::report::{LaunchSummary, RunSummary, TeardownSummary};
use super::scenario::GuestSpec;
use super::{RunArgs, RunError};

/// The KVM guest program a built-in name runs.
fn program(spec: &GuestSpec) -> Result<(String, GuestProgram), RunError> {
    let name = match spec {
        GuestSpec::Builtin(n) => n.as_str(),
        GuestSpec::File(p) => {
            return Err(RunError::Input(format!(
                "--guest {}: scripted guests run on the simulator; the kvm backend runs its own guest programs (builtin:boot, builtin:ap-churn)",
                p.display()
            )));
        }
    };
    let kvm_name = match name {
        "boot" => "ap-creation-once",
        "ap-churn" => "ap-creation",
        other => {
            return Err(RunError::Input(format!(
                "--guest builtin:{other} needs the simulator (--backend sim); the kvm backend runs builtin:boot and builtin:ap-churn"
            )));
        }
    };
    let p = GuestProgram::builtin(kvm_name)
        .ok_or_else(|| RunError::Input(format!("backend-kvm has no guest program '{kvm_name}'")))?;
    Ok((kvm_name.to_owned(), p))
}

struct Waiter {
    done: EventFd,
    tick: TimerFd,
    finished: std::rc::Rc<std::cell::Cell<bool>>,
    progress: std::rc::Rc<Progress>,
}

impl MutEventSubscriber for Waiter {
    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        if events.fd() == self.done.as_raw_fd() {
            let _ = self.done.read();
            self.finished.set(true);
        } else {
            let _ = self.tick.wait();
            self.progress.inc(0);
        }
    }

    fn init(&mut self, ops: &mut EventOps<'_>) {
        let _ = ops.add(Events::new(&self.done, EventSet::IN));
        let _ = ops.add(Events::new(&self.tick, EventSet::IN));
    }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |e| RunError::Output(format!("event loop: {what}: {e}"))
}

/// Run the guest on KVM as `args` ask.
pub(super) fn run(args: &RunArgs, progress: Progress) -> Result<RunSummary, RunError> {
    if args.sev_es {
        return Err(RunError::Input(
            "--sev-es: the kvm backend runs SEV-SNP where the host has it, else VMSA-image mode; it has no SEV-ES path".into(),
        ));
    }
    for (flag, given) in [
        ("--firmware", args.firmware.is_some()),
        ("--trace", args.trace.is_some()),
        ("--costs", args.costs.is_some()),
        ("--fault", args.fault.is_some()),
    ] {
        if given {
            return Err(RunError::Input(format!(
                "{flag} belongs to the simulator (--backend sim); the kvm backend has no simulated firmware, costs or fault plan"
            )));
        }
    }
    let (name, guest) = program(&args.guest)?;
    let cfg = RunConfig {
        vcpus: args.vcpus.get(),
        memory: args.memory.bytes(),
        guest,
        mode: ModeChoice::Auto,
        timeout: Duration::from_secs(60),
    };

    let done = EventFd::new(EFD_NONBLOCK).map_err(os("eventfd"))?;
    let signal = done.try_clone().map_err(os("eventfd clone"))?;
    let mut tick = TimerFd::new().map_err(|e| os("timerfd")(errno(e)))?;
    tick.reset(Duration::from_millis(200), Some(Duration::from_millis(200)))
        .map_err(|e| os("timerfd arm")(errno(e)))?;
    let progress = std::rc::Rc::new(progress);
    progress.phase("kvm", 0);
    progress.message(format!("{} vCPUs running {name}", cfg.vcpus));
    let finished = std::rc::Rc::new(std::cell::Cell::new(false));
    let mut em: EventManager<Waiter> =
        EventManager::new().map_err(|e| RunError::Output(format!("event loop: epoll: {e:?}")))?;
    em.add_subscriber(Waiter {
        done,
        tick,
        finished: finished.clone(),
        progress: progress.clone(),
    });
    let worker = std::thread::Builder::new()
        .name("vmm-kvm".into())
        .spawn(move || {
            let r = backend_kvm::run(&cfg);
            let _ = signal.write(1);
            r
        })
        .map_err(os("spawn"))?;
    while !finished.get() {
        em.run()
            .map_err(|e| RunError::Output(format!("event loop: epoll_wait: {e:?}")))?;
    }
    progress.finish();
    let report = worker
        .join()
        .map_err(|_| RunError::Output("the KVM worker thread panicked".into()))??;

    let mut ownership = Ledger::with_histories(report.histories.clone());
    ownership.ap_requests = report.accepted_requests.len();
    let mut problems = Vec::new();
    if !report.completed {
        problems.push(if report.timed_out {
            "the guest did not finish before the watchdog".to_owned()
        } else {
            "the guest did not complete (see the vCPU records)".to_owned()
        });
    }
    let mut summary = RunSummary {
        backend: "kvm",
        mode: report.mode.to_string(),
        mode_reason: Some(report.mode_reason.clone()),
        vcpus: report.vcpus,
        memory: report.memory,
        memory_layout: "guest_memfd-backed RAM from GPA 0".into(),
        guest: args.guest.to_string(),
        scenario: name,
        ok: true,
        problems,
        warnings: Vec::new(),
        launch: LaunchSummary {
            state: LaunchState::Finished,
            error: None,
            expected_failure: false,
            image: "backend-kvm guest program".into(),
            data_pages: report.platform.data_pages,
            vmsas: report.vcpus,
            digest: None,
            expected_digest: None,
            digest_matches: None,
            policy: 0,
        },
        ownership,
        guest_run: None,
        rmp_faults: 0,
        faults_injected: Vec::new(),
        phases: Vec::new(),
        costs: None,
        teardown: TeardownSummary {
            vcpus: report.teardown.vcpus,
            vmsas_leaked: report.teardown.leaked,
            frames_still_allocated: report.teardown.host_pages_live as u64,
            ..TeardownSummary::default()
        },
        trace: None,
        kvm: Some(report),
    };
    summary.judge(false, true);
    Ok(summary)
}
