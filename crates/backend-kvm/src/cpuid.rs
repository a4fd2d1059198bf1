//! The CPUID table each vCPU gets before its first run (`KVM_SET_CPUID2`).
//!
//! The table is KVM's supported table with the vCPU's APIC ID patched into leaf 1 (EBX
//! bits 31:24) and leaf 0xB (EDX). It advertises no SEV: leaf 0x8000001F stays as KVM
//! reports it (all zero on hosts without SEV), because a VMSA-image VM has no encryption.
//! Set it before KVM_SET_SREGS puts the vCPU in long mode: KVM refuses an EFER with LME/LMA
//! unless the guest's CPUID has long mode (`__kvm_valid_efer`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{IoctlContext, IoctlError};

/// KVM's supported CPUID table (read once per VM and cloned per vCPU).
pub fn supported(kvm: &Kvm) -> Result<CpuId, IoctlError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .ioctl("KVM_GET_SUPPORTED_CPUID")
}

/// [`supported`], read on a thread of its own while the VM is set up: `KVM_GET_SUPPORTED_CPUID`
/// runs CPUID for every leaf in the kernel, and on a host that is itself a guest each one traps
/// to the hypervisor below (0.3-0.8 ms in all on the PVM development hosts, a tenth of a small
/// `vmm run`). Whoever needs the table first and finds the read not begun reads it itself, so
/// nobody waits for a thread that has not been scheduled; one that finds it under way waits for
/// it to end.
#[derive(Debug)]
pub struct SupportedLater {
    /// The system fd until a thread claims the read.
    kvm: Mutex<Option<Kvm>>,
    table: OnceLock<Result<CpuId, IoctlError>>,
    read: Condvar,
}

impl SupportedLater {
    /// Start reading the table on a helper thread (or leave it to the first [`Self::get`] if
    /// no thread can be started).
    pub fn start(kvm: Kvm) -> Arc<Self> {
        let this = Arc::new(Self {
            kvm: Mutex::new(Some(kvm)),
            table: OnceLock::new(),
            read: Condvar::new(),
        });
        let helper = this.clone();
        let _ = std::thread::Builder::new()
            .name("kvm-cpuid".into())
            .spawn(move || helper.read_if_unclaimed());
        this
    }

    /// A table whose read failed with `e` (for tests of what callers do with the failure).
    #[cfg(test)]
    pub(crate) fn failed(e: IoctlError) -> Arc<Self> {
        let this = Self {
            kvm: Mutex::new(None),
            table: OnceLock::new(),
            read: Condvar::new(),
        };
        let _ = this.table.set(Err(e));
        Arc::new(this)
    }

    /// The table, read by now or by this call.
    pub fn get(&self) -> Result<&CpuId, IoctlError> {
        self.read_if_unclaimed();
        let mut kvm = lock(&self.kvm);
        loop {
            if let Some(t) = self.table.get() {
                return t.as_ref().map_err(|e| *e);
            }
            kvm = self.read.wait(kvm).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn read_if_unclaimed(&self) {
        let Some(kvm) = lock(&self.kvm).take() else {
            return;
        };
        // Set even if the read unwinds, so that no waiter waits for ever; and the fd is closed
        // before the table is published, so that whoever gets the table finds no /dev/kvm fd
        // left open by this read (a process counting its fds after a teardown sees none).
        struct Publish<'a> {
            later: &'a SupportedLater,
            kvm: Option<Kvm>,
            read: Option<Result<CpuId, IoctlError>>,
        }
        impl Drop for Publish<'_> {
            fn drop(&mut self) {
                drop(self.kvm.take());
                let read = self.read.take().unwrap_or(Err(IoctlError::new(
                    "KVM_GET_SUPPORTED_CPUID",
                    kvm_ioctls::Error::new(libc::EIO),
                )));
                let _ = self.later.table.set(read);
                let _held = lock(&self.later.kvm);
                self.later.read.notify_all();
            }
        }
        let mut publish = Publish {
            later: self,
            kvm: Some(kvm),
            read: None,
        };
        publish.read = publish.kvm.as_ref().map(supported);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `table` with `apic_id` in leaves 1 and 0xB.
pub fn for_vcpu(table: &CpuId, apic_id: u32) -> CpuId {
    let mut t = table.clone();
    for e in t.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << 24),
            0xb => e.edx = apic_id,
            _ => {}
        }
    }
    t
}

/// The C-bit position (CPUID 0x8000_001F `EBX[5:0]`, AMD APM vol. 3), or the leaf's EBX when
/// the table has none (a host without SEV).
pub fn c_bit(table: &CpuId) -> Result<u32, u32> {
    let ebx = table
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_001f)
        .map_or(0, |e| e.ebx);
    match ebx & 0x3f {
        0 => Err(ebx),
        b => Ok(b),
    }
}

/// Guest MAXPHYADDR from CPUID 0x8000_0008 `EAX[7:0]` (AMD APM vol. 3), 48 if absent.
pub fn max_phys_bits(table: &CpuId) -> u8 {
    table
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|b| *b > 0)
        .unwrap_or(48)
}

/// Give `vcpu` the table for `apic_id`.
pub fn set(vcpu: &VcpuFd, table: &CpuId, apic_id: u32) -> Result<(), IoctlError> {
    vcpu.set_cpuid2(&for_vcpu(table, apic_id)).ioctl("KVM_SET_CPUID2")
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    #[test]
    fn the_table_read_later_is_the_table_whoever_reads_it() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: /dev/kvm is not usable here");
            return;
        };
        let direct = supported(&kvm).unwrap();
        for _ in 0..20 {
            let later = SupportedLater::start(Kvm::new().unwrap());
            // Racing the helper: each thread gets the one table, read once.
            let tables: Vec<CpuId> = std::thread::scope(|s| {
                let readers: Vec<_> = (0..4).map(|_| s.spawn(|| later.get().unwrap().clone())).collect();
                readers.into_iter().map(|r| r.join().unwrap()).collect()
            });
            // Leaves 1 and 0xB carry the APIC ID of the CPU the read ran on, which each vCPU's
            // table replaces.
            for t in &tables {
                assert_eq!(for_vcpu(t, 0).as_slice(), for_vcpu(&direct, 0).as_slice());
            }
            assert!(std::ptr::eq(later.get().unwrap(), later.get().unwrap()));
        }
    }

    #[test]
    fn whoever_gets_the_table_finds_the_read_s_fd_closed() {
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::time::{Duration, Instant};
        // The system fd moved to a number at or above 512, which the /dev/kvm opens of tests
        // running beside this one (in one process under `cargo test`) never reuse: they take
        // the lowest free number.
        fn high_fd(kvm: Kvm) -> Kvm {
            // SAFETY: F_DUPFD_CLOEXEC only reads its arguments; `kvm` is an open fd.
            let high = unsafe { libc::fcntl(kvm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 512) };
            assert!(
                high >= 512,
                "fcntl(F_DUPFD_CLOEXEC): {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `high` is a fresh fd of /dev/kvm that nothing else owns.
            unsafe { Kvm::from_raw_fd(high) }
        }
        if Kvm::new().is_err() {
            eprintln!("skipped: /dev/kvm is not usable here");
            return;
        }
        // The helper may run to the end before this thread looks (it shares a CPU with it),
        // so look many times: a closing after the publishing is caught in most of them.
        for _ in 0..50 {
            let kvm = high_fd(Kvm::new().unwrap());
            let fd = kvm.as_raw_fd();
            let later = SupportedLater::start(kvm);
            // Once the helper has claimed the read, hold the lock it takes to wake waiters, so
            // that it cannot get past publishing the table while we look.
            let deadline = Instant::now() + Duration::from_secs(10);
            let held = loop {
                let g = lock(&later.kvm);
                if g.is_none() {
                    break g;
                }
                drop(g);
                assert!(Instant::now() < deadline, "the helper never claimed the read");
                std::thread::yield_now();
            };
            while later.table.get().is_none() {
                std::thread::yield_now();
            }
            let open = std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|p| p.ends_with("kvm"));
            drop(held);
            assert!(
                !open,
                "fd {fd} (/dev/kvm) is still open when the table is published"
            );
            assert!(later.get().is_ok());
        }
    }

    #[test]
    fn apic_id_goes_into_leaves_1_and_0xb() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0a0b_0c0d,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 0,
                ..Default::default()
            },
        ];
        let t = CpuId::from_entries(&entries).unwrap();
        let p = for_vcpu(&t, 0x42);
        assert_eq!(p.as_slice()[0].ebx, 0x420b_0c0d);
        assert_eq!(p.as_slice()[1].edx, 0x42);
    }

    #[test]
    fn c_bit_and_max_phys_bits_from_their_leaves() {
        let t = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0x8000_001f,
                ebx: 0x16f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                eax: 0x3034,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(c_bit(&t), Ok(0x2f));
        assert_eq!(max_phys_bits(&t), 0x34);
        let empty = CpuId::from_entries(&[]).unwrap();
        assert_eq!(c_bit(&empty), Err(0));
        assert_eq!(max_phys_bits(&empty), 48);
    }
}
