//! The vCPU and control loop for the simulator, on event-manager.
//!
//! Every vCPU is an event subscriber with a kick `EventFd`: when it is kicked it runs the
//! guest's actions that are its own, in script order, until the next action belongs to another
//! vCPU, whose eventfd it then signals (the hand-over of a real SMP guest, made deterministic).
//! A GHCB AP-creation request or an INIT also kicks its target, as KVM's
//! `kvm_make_request_and_kick` does; the target wakes, and its next entry applies the request
//! (vmsa-core's `prepare_entry`). A control subscriber owns the "guest finished" eventfd and a
//! watchdog `TimerFd`, so a guest that stops making progress ends the run with an error
//! instead of hanging it (it bounds the wall-clock time of the whole guest). Everything runs on one thread: the simulator is deterministic, and
//! the loop is where a real VMM's vCPU threads would report their exits.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use backend_sim::guest::{GuestAction, GuestScript, Runner, ScriptReport};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use super::progress::Progress;

/// Why the loop could not run the guest to its end.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// An eventfd, timerfd or epoll call failed.
    #[error("event loop: {what}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The watchdog fired.
    #[error("the guest made no progress for {0:?} (watchdog); {1} of {2} actions ran")]
    Watchdog(Duration, usize, usize),
}

/// vmm-sys-util's errno as an I/O error.
pub(crate) fn errno(e: vmm_sys_util::errno::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> DispatchError {
    move |source| DispatchError::Os { what, source }
}

/// What the loop did besides the script report.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoopStats {
    /// Times each vCPU's subscriber woke (its kick eventfd fired), by vCPU index.
    pub wakeups: Vec<u64>,
    /// Kicks sent by AP-creation requests and INITs.
    pub ap_kicks: u64,
    /// Epoll dispatch rounds.
    pub rounds: u64,
}

struct Shared<'a> {
    runner: Option<Runner<'a>>,
    script: &'a GuestScript,
    next: usize,
    kicks: Vec<EventFd>,
    done: EventFd,
    stats: LoopStats,
    progress: &'a Progress,
}

impl Shared<'_> {
    fn kick(&mut self, vcpu: u32) {
        if let Some(fd) = self.kicks.get(vcpu as usize) {
            // An eventfd counter only overflows after 2^64 - 2 writes.
            let _ = fd.write(1);
        }
    }

    /// Run this vCPU's actions, then hand over to the next action's vCPU, or signal the end.
    fn run_from(&mut self, vcpu: u32) {
        while let Some(a) = self.script.actions.get(self.next) {
            if a.vcpu() != vcpu {
                let owner = a.vcpu();
                self.kick(owner);
                return;
            }
            let index = self.next;
            self.next += 1;
            let runner = self
                .runner
                .as_mut()
                .expect("the runner lives until the loop ends");
            let ok = runner.step(index, a).error.is_none();
            self.progress.inc(1);
            if ok && let Some(target) = kicked_by(a) {
                self.stats.ap_kicks += 1;
                self.kick(target);
            }
        }
        let _ = self.done.write(1);
    }
}

/// The vCPU an action kicks (AP creation except CREATE_ON_INIT, AP destroy, INIT).
fn kicked_by(a: &GuestAction) -> Option<u32> {
    match *a {
        GuestAction::ApCreate {
            apic_id,
            on_init: false,
            ..
        }
        | GuestAction::ApDestroy { apic_id, .. }
        | GuestAction::SendInit { apic_id, .. } => Some(apic_id),
        _ => None,
    }
}

struct VcpuSubscriber<'a> {
    vcpu: u32,
    kick: EventFd,
    shared: Rc<RefCell<Shared<'a>>>,
}

impl MutEventSubscriber for VcpuSubscriber<'_> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps<'_>) {
        // Drain the counter: one wake-up may stand for several kicks.
        if self.kick.read().is_err() {
            return;
        }
        let mut s = self.shared.borrow_mut();
        s.stats.wakeups[self.vcpu as usize] += 1;
        s.run_from(self.vcpu);
    }

    fn init(&mut self, ops: &mut EventOps<'_>) {
        // Registration fails only if epoll itself is broken; the watchdog then ends the run.
        let _ = ops.add(Events::new(&self.kick, EventSet::IN));
    }
}

#[derive(Default)]
struct Outcome {
    finished: bool,
    watchdog: bool,
}

struct Control {
    done: EventFd,
    watchdog: TimerFd,
    outcome: Rc<RefCell<Outcome>>,
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        let mut o = self.outcome.borrow_mut();
        if events.fd() == self.done.as_raw_fd() {
            let _ = self.done.read();
            o.finished = true;
        } else if events.fd() == self.watchdog.as_raw_fd() {
            let _ = self.watchdog.wait();
            o.watchdog = true;
        }
    }

    fn init(&mut self, ops: &mut EventOps<'_>) {
        let _ = ops.add(Events::new(&self.done, EventSet::IN));
        let _ = ops.add(Events::new(&self.watchdog, EventSet::IN));
    }
}

/// Run `script` with `runner` on `vcpus` vCPUs through the event loop; `watchdog` bounds the
/// wall-clock time of the whole script.
pub fn run(
    runner: Runner<'_>,
    script: &GuestScript,
    vcpus: u32,
    watchdog: Duration,
    progress: &Progress,
) -> Result<(ScriptReport, LoopStats), DispatchError> {
    if script.actions.is_empty() {
        return Ok((runner.finish(), LoopStats::default()));
    }
    let new_fd = |what| EventFd::new(EFD_NONBLOCK).map_err(os(what));
    let done = new_fd("eventfd")?;
    let mut kicks = Vec::new();
    let mut subscribers = Vec::new();
    for _ in 0..vcpus {
        let fd = new_fd("eventfd")?;
        subscribers.push(fd.try_clone().map_err(os("eventfd clone"))?);
        kicks.push(fd);
    }
    let shared = Rc::new(RefCell::new(Shared {
        runner: Some(runner),
        script,
        next: 0,
        kicks,
        done: done.try_clone().map_err(os("eventfd clone"))?,
        stats: LoopStats {
            wakeups: vec![0; vcpus as usize],
            ..LoopStats::default()
        },
        progress,
    }));
    let outcome = Rc::new(RefCell::new(Outcome::default()));
    let mut timer = TimerFd::new().map_err(|e| os("timerfd")(errno(e)))?;
    timer
        .reset(watchdog, None)
        .map_err(|e| os("timerfd arm")(errno(e)))?;
    let mut em: EventManager<Box<dyn MutEventSubscriber + '_>> =
        EventManager::new().map_err(|e| DispatchError::Os {
            what: "epoll",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    for (vcpu, kick) in subscribers.into_iter().enumerate() {
        em.add_subscriber(Box::new(VcpuSubscriber {
            vcpu: vcpu as u32,
            kick,
            shared: shared.clone(),
        }));
    }
    em.add_subscriber(Box::new(Control {
        done,
        watchdog: timer,
        outcome: outcome.clone(),
    }));
    // The first action's vCPU starts the guest.
    shared.borrow_mut().kick(script.actions[0].vcpu());
    loop {
        em.run().map_err(|e| DispatchError::Os {
            what: "epoll_wait",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        let mut s = shared.borrow_mut();
        s.stats.rounds += 1;
        let o = outcome.borrow();
        if o.finished {
            break;
        }
        if o.watchdog {
            return Err(DispatchError::Watchdog(watchdog, s.next, script.actions.len()));
        }
    }
    drop(em);
    let mut s = Rc::try_unwrap(shared)
        .map_err(|_| DispatchError::Os {
            what: "subscriber teardown",
            source: std::io::Error::other("subscribers still hold the loop state"),
        })?
        .into_inner();
    let report = s.runner.take().expect("runner present").finish();
    Ok((report, s.stats))
}
