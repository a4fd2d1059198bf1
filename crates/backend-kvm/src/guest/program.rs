//! The guest program, assembled when backend-kvm is built: the build script runs
//! `src/guest/asm.rs` (iced-x86's code assembler) and writes [`PROGRAM`]. Assembling it when a
//! VM is built cost each VMM process ~0.5 ms, nearly all of it iced-x86 building its encoder
//! tables on first use.
//!
//! Three entry points share one image at [`CODE_GPA`](super::layout::CODE_GPA):
//!
//! - [`Entries::scenario`] (BSP): derive SEV_FEATURES from the SEV_STATUS MSR (`>> 2`, as
//!   Linux does), then for every APIC ID `1..n`: write the VMSA template into the AP's page,
//!   patch RDI (APIC ID), RSI (generation) and SEV_FEATURES, and ask for `AP_CREATE` through
//!   the GHCB. The AP pages are fresh (zero since launch), so only the template's non-zero
//!   stretches are written ([`template_stretches`](super::layout::template_stretches)), as
//!   Linux fills a zeroed page field by field: every guest store is emulated on PVM hosts, where
//!   a whole copy (206 qwords) cost ~0.3 ms per AP. Wait until every AP has reported
//!   through its mailbox. If asked (flag bit 0), `AP_DESTROY` AP 1, rewrite its VMSA whole
//!   with generation 2, `AP_CREATE` it again and wait for its new report. Then `OUT DONE`.
//! - [`Entries::requests`] (BSP): issue every request of the table at [`REQUESTS_GPA`](super::layout::REQUESTS_GPA)
//!   (`exit_info_1`, `exit_info_2`, RAX, flags: bit 0 RAX valid, bit 1 write an AP VMSA at
//!   `exit_info_2` first) and store each `(sw_exit_info_1, sw_exit_info_2)` at
//!   [`RESULTS_GPA`](super::layout::RESULTS_GPA); wait for the expected number of AP reports; `OUT DONE`.
//! - [`Entries::ap`] (APs): write `generation << 32 | apic_id` to the mailbox, `lock inc` the
//!   report counter, `OUT DONE`.
//! - [`Entries::spin`]: `jmp $`, a vCPU stuck in `KVM_RUN` for the watchdog to end.
//! - [`Entries::halt`]: `HLT` with nothing to wake it (KVM halts the vCPU in the kernel, its
//!   local APIC being there), for the watchdog to end.
//! - [`Entries::igvm`] (BSP of an IGVM launch): the scenario, with the vCPU count read from the
//!   IGVM VP-count parameter the loader wrote at [`IGVM_PARAMS_GPA`](super::layout::IGVM_PARAMS_GPA)
//!   instead of from RDI, so that the BSP's VMSA (the file's VP context) is the same for every
//!   vCPU count; a count of 0 or above 512 is reported on the FAIL port (`fail::VP_COUNT`).
//!
//! A request is a GHCB-style doorbell: the guest fills the GHCB (exit code 0x8000_0013,
//! `exit_info_1`, `exit_info_2`, RAX, the valid bitmap, usage 0) and writes the GHCB's GPA
//! to the GHCB MSR (0xC001_0130), which exits to the VMM as a userspace MSR write; the VMM
//! answers in `sw_exit_info_1/2`. The code is CPL0, integer-only and within the instruction
//! set KVM's instruction emulator handles on PVM hosts (`x86_emulate_insn`): mov, add/shl/shr/or, cmp/test/jcc, call/ret,
//! push-free subroutines, `rep movsq`, `lock inc`, rdmsr/wrmsr, out, hlt.

/// Where each entry point starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entries {
    /// The BSP's AP-creation scenario.
    pub scenario: u64,
    /// The BSP's request-table program.
    pub requests: u64,
    /// The APs' entry.
    pub ap: u64,
    /// A vCPU that never exits (`jmp $`): only the watchdog gets it out of `KVM_RUN`.
    pub spin: u64,
    /// A vCPU that halts (`hlt`) and waits for an interrupt that never comes.
    pub halt: u64,
    /// The BSP's AP-creation scenario in an IGVM launch (the vCPU count from the IGVM
    /// VP-count parameter).
    pub igvm: u64,
}

/// The assembled program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    /// The machine code, to be loaded at [`CODE_GPA`](super::layout::CODE_GPA).
    pub code: &'static [u8],
    /// Its entry points (guest-virtual = guest-physical addresses).
    pub entries: Entries,
}

// `pub const PROGRAM: Program`, written by the build script (`build.rs`).
include!(concat!(env!("OUT_DIR"), "/guest_program.rs"));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::{CODE_GPA, CODE_MAX};

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_entries_lie_in_the_code_within_its_region() {
        let p = PROGRAM;
        assert!(p.code.len() as u64 <= CODE_MAX);
        assert_eq!(p.entries.scenario, CODE_GPA);
        let end = CODE_GPA + p.code.len() as u64;
        for e in [
            p.entries.requests,
            p.entries.ap,
            p.entries.spin,
            p.entries.igvm,
            p.entries.halt,
        ] {
            assert!((CODE_GPA..end).contains(&e), "{e:#x}");
        }
    }

    #[test]
    fn uses_the_doorbell_and_no_hypercall() {
        let p = PROGRAM;
        let c = p.code;
        assert!(contains(c, &[0x0f, 0x30]), "wrmsr");
        assert!(contains(c, &[0x0f, 0x32]), "rdmsr");
        // mov ecx, 0xC0010130 (GHCB MSR) and mov ecx, 0xC0010131 (SEV_STATUS).
        assert!(contains(c, &[0xb9, 0x30, 0x01, 0x01, 0xc0]));
        assert!(contains(c, &[0xb9, 0x31, 0x01, 0x01, 0xc0]));
        // out 0x10, eax (DONE) and rep movsq.
        assert!(contains(c, &[0xe7, 0x10]));
        assert!(contains(c, &[0xf3, 0x48, 0xa5]));
        // VMMCALL / VMCALL livelock on this host's KVM: they must never appear.
        assert!(!contains(c, &[0x0f, 0x01, 0xd9]));
        assert!(!contains(c, &[0x0f, 0x01, 0xc1]));
        // The AP entry starts with mov rax, rsi.
        let ap = (p.entries.ap - CODE_GPA) as usize;
        assert_eq!(&c[ap..ap + 3], &[0x48, 0x89, 0xf0]);
        // The IGVM entry starts by reading the VP count: mov rax, IGVM_PARAMS_GPA;
        // mov edi, [rax] (the offset is 0).
        let igvm = (p.entries.igvm - CODE_GPA) as usize;
        let mut want = vec![0x48, 0xb8];
        want.extend_from_slice(&crate::guest::layout::IGVM_PARAMS_GPA.to_le_bytes());
        want.extend_from_slice(&[0x8b, 0x38]);
        assert_eq!(crate::guest::layout::IGVM_VP_COUNT_OFFSET, 0);
        assert_eq!(&c[igvm..igvm + want.len()], &want[..]);
    }
}
