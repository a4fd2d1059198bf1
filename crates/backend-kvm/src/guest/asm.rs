//! The guest program's source: [`assemble`] builds it with iced-x86's code assembler. This file
//! is compiled by backend-kvm's build script, not into the library: the build writes the
//! code and its entry points into `guest::program::PROGRAM`, where the program is described.

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};
use vmsa_core::ghcb::{self, GHCB_MSR};

use crate::layout::{
    CODE_GPA, GHCB_GPA, IGVM_PARAMS_GPA, IGVM_VP_COUNT_OFFSET, MAILBOX_GPA, MAX_VCPUS, MSR_SEV_STATUS,
    PARAMS_GPA, REQUESTS_GPA, RESULTS_GPA, TEMPLATE_BYTES, TEMPLATE_GPA, VMSA_BASE, fail, params, ports,
    template_stretches,
};

/// Qwords of the template the guest copies (the defined part of the save area).
const TEMPLATE_QWORDS: u32 = (TEMPLATE_BYTES / 8) as u32;

/// A stretch at least this long is copied with `rep movsq` (four instructions to set up, then
/// one emulated iteration per qword); a shorter one qword by qword (two instructions each).
const REP_MIN_QWORDS: u32 = 3;

/// The program assembled for [`CODE_GPA`]: its code and its entry points (scenario, requests,
/// AP, spin, IGVM scenario, halt).
pub fn assemble() -> Result<(Vec<u8>, [u64; 6]), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut scenario = a.create_label();
    let mut requests = a.create_label();
    let mut ap = a.create_label();
    let mut ghcb_call = a.create_label();
    let mut write_vmsa = a.create_label();
    let mut write_fresh_vmsa = a.create_label();
    let mut patch_vmsa = a.create_label();
    let mut sev_features = a.create_label();
    let mut spin = a.create_label();
    let mut halt = a.create_label();
    let mut igvm = a.create_label();

    // ---- BSP: AP-creation scenario. In: rdi = n_vcpus, rsp = stack.
    a.set_label(&mut scenario)?;
    a.mov(r14, rdi)?;
    a.call(sev_features)?;
    a.mov(r13, 1u64)?;
    let mut create_loop = a.create_label();
    let mut created = a.create_label();
    let mut fail_create = a.create_label();
    a.set_label(&mut create_loop)?;
    a.cmp(r13, r14)?;
    a.jae(created)?;
    // VMSA at VMSA_BASE + apic * 4096.
    a.mov(rdi, r13)?;
    a.shl(rdi, 12)?;
    a.add(rdi, VMSA_BASE as i32)?;
    a.mov(rbp, rdi)?;
    a.mov(rsi, r13)?;
    a.mov(rdx, 1u64)?;
    a.call(write_fresh_vmsa)?;
    // exit_info_1 = apic << 32 | AP_CREATE; exit_info_2 = the VMSA; RAX = SEV_FEATURES.
    a.mov(rbx, r13)?;
    a.shl(rbx, 32)?;
    a.or(rbx, vmsa_core::ghcb::AP_CREATE as i32)?;
    a.mov(rax, r15)?;
    a.mov(r8, 1u64)?;
    a.call(ghcb_call)?;
    a.test(rax, rax)?;
    a.jnz(fail_create)?;
    a.inc(r13)?;
    a.jmp(create_loop)?;

    a.set_label(&mut created)?;
    // Wait for n - 1 reports.
    a.mov(r12, r14)?;
    a.dec(r12)?;
    wait_counter(&mut a, r12)?;

    let mut done = a.create_label();
    let mut fail_destroy = a.create_label();
    let mut fail_recreate = a.create_label();
    a.mov(rax, PARAMS_GPA)?;
    a.mov(rax, qword_ptr(rax + params::FLAGS as i32))?;
    a.test(rax, params::FLAG_RECREATE as i32)?;
    a.jz(done)?;
    a.cmp(r14, 2)?;
    a.jb(done)?;
    // AP_DESTROY of APIC ID 1 (no RAX, no GPA).
    a.mov(rbx, (1u64 << 32) | u64::from(vmsa_core::ghcb::AP_DESTROY))?;
    a.xor(ebp, ebp)?;
    a.xor(eax, eax)?;
    a.xor(r8d, r8d)?;
    a.call(ghcb_call)?;
    a.test(rax, rax)?;
    a.jnz(fail_destroy)?;
    // Forget the old report, write a generation-2 VMSA and create the AP again.
    a.mov(rax, MAILBOX_GPA)?;
    a.mov(qword_ptr(rax + 8), 0)?;
    a.mov(rdi, VMSA_BASE + 0x1000)?;
    a.mov(rbp, rdi)?;
    a.mov(rsi, 1u64)?;
    a.mov(rdx, 2u64)?;
    a.call(write_vmsa)?;
    a.mov(rbx, (1u64 << 32) | u64::from(vmsa_core::ghcb::AP_CREATE))?;
    a.mov(rax, r15)?;
    a.mov(r8, 1u64)?;
    a.call(ghcb_call)?;
    a.test(rax, rax)?;
    a.jnz(fail_recreate)?;
    // Wait for the generation-2 report.
    a.mov(r12, (2u64 << 32) | 1)?;
    let mut wait2 = a.create_label();
    a.set_label(&mut wait2)?;
    a.mov(rax, MAILBOX_GPA)?;
    a.mov(rax, qword_ptr(rax + 8))?;
    a.cmp(rax, r12)?;
    a.je(done)?;
    a.out(ports::YIELD as u32, al)?;
    a.jmp(wait2)?;

    a.set_label(&mut done)?;
    a.xor(eax, eax)?;
    a.out(ports::DONE as u32, eax)?;
    a.hlt()?;

    for (label, code) in [
        (&mut fail_create, fail::CREATE),
        (&mut fail_destroy, fail::DESTROY),
        (&mut fail_recreate, fail::RECREATE),
    ] {
        a.set_label(label)?;
        a.mov(rcx, PARAMS_GPA)?;
        a.mov(qword_ptr(rcx + params::RESP1 as i32), rax)?;
        a.mov(qword_ptr(rcx + params::RESP2 as i32), rdx)?;
        a.mov(eax, code)?;
        a.out(ports::FAIL as u32, eax)?;
        a.hlt()?;
    }

    // ---- BSP: request table. In: rdi = number of requests.
    a.set_label(&mut requests)?;
    a.mov(r14, rdi)?;
    a.call(sev_features)?;
    a.xor(r13d, r13d)?;
    let mut req_loop = a.create_label();
    let mut req_done = a.create_label();
    let mut no_vmsa = a.create_label();
    a.set_label(&mut req_loop)?;
    a.cmp(r13, r14)?;
    a.jae(req_done)?;
    request_entry(&mut a, r12)?;
    a.mov(r8, qword_ptr(r12 + 24))?;
    a.test(r8, 2)?;
    a.jz(no_vmsa)?;
    // Write a VMSA for apic = exit_info_1 >> 32 at exit_info_2, generation 1.
    a.mov(rdi, qword_ptr(r12 + 8))?;
    a.mov(rsi, qword_ptr(r12))?;
    a.shr(rsi, 32)?;
    a.mov(rdx, 1u64)?;
    a.call(write_vmsa)?;
    a.set_label(&mut no_vmsa)?;
    a.mov(rbx, qword_ptr(r12))?;
    a.mov(rbp, qword_ptr(r12 + 8))?;
    a.mov(rax, qword_ptr(r12 + 16))?;
    a.mov(r8, qword_ptr(r12 + 24))?;
    a.and(r8, 1)?;
    a.call(ghcb_call)?;
    a.mov(r12, r13)?;
    a.shl(r12, 4)?;
    a.add(r12, RESULTS_GPA as i32)?;
    a.mov(qword_ptr(r12), rax)?;
    a.mov(qword_ptr(r12 + 8), rdx)?;
    // Flags bits 63:8: AP reports to wait for before the next request (0: none).
    let mut no_wait = a.create_label();
    request_entry(&mut a, r12)?;
    a.mov(r12, qword_ptr(r12 + 24))?;
    a.shr(r12, 8)?;
    a.jz(no_wait)?;
    wait_counter(&mut a, r12)?;
    // wait_counter's end label takes the next instruction: give it an empty one of its own.
    a.zero_bytes()?;
    a.set_label(&mut no_wait)?;
    a.inc(r13)?;
    a.jmp(req_loop)?;
    a.set_label(&mut req_done)?;
    a.mov(rax, PARAMS_GPA)?;
    a.mov(r12, qword_ptr(rax + params::EXPECT_REPORTS as i32))?;
    wait_counter(&mut a, r12)?;
    a.xor(eax, eax)?;
    a.out(ports::DONE as u32, eax)?;
    a.hlt()?;

    // ---- AP. In: rdi = APIC ID, rsi = generation (from the VMSA the BSP wrote).
    a.set_label(&mut ap)?;
    a.mov(rax, rsi)?;
    a.shl(rax, 32)?;
    a.or(rax, rdi)?;
    a.mov(rcx, MAILBOX_GPA)?;
    a.mov(qword_ptr(rcx + rdi * 8), rax)?;
    a.mov(rcx, PARAMS_GPA)?;
    a.lock().inc(qword_ptr(rcx + params::COUNTER as i32))?;
    a.mov(eax, edi)?;
    a.out(ports::DONE as u32, eax)?;
    a.hlt()?;

    // ---- spin: never exits.
    a.set_label(&mut spin)?;
    a.jmp(spin)?;

    // ---- halt: HLT with nothing to wake it; again if anything does.
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;

    // ---- BSP of an IGVM launch: rdi = the IGVM VP-count parameter (a u32 the loader wrote
    //      into the unmeasured parameter page), which must be 1..=MAX_VCPUS (the loader is
    //      not trusted: the IGVM spec asks guests to check parameter values), then the
    //      scenario. Out of range: FAIL with the value in RESP1.
    a.set_label(&mut igvm)?;
    let mut bad_count = a.create_label();
    a.mov(rax, IGVM_PARAMS_GPA)?;
    a.mov(edi, dword_ptr(rax + IGVM_VP_COUNT_OFFSET as i32))?;
    a.test(edi, edi)?;
    a.jz(bad_count)?;
    a.cmp(edi, MAX_VCPUS as i32)?;
    a.ja(bad_count)?;
    a.jmp(scenario)?;
    a.set_label(&mut bad_count)?;
    a.mov(rcx, PARAMS_GPA)?;
    a.mov(qword_ptr(rcx + params::RESP1 as i32), rdi)?;
    a.mov(eax, fail::VP_COUNT)?;
    a.out(ports::FAIL as u32, eax)?;
    a.hlt()?;

    // ---- sev_features: r15 = SEV_STATUS >> 2; also stored in the parameter page.
    a.set_label(&mut sev_features)?;
    a.mov(ecx, MSR_SEV_STATUS)?;
    a.rdmsr()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.shr(rax, 2)?;
    a.mov(r15, rax)?;
    a.mov(rax, PARAMS_GPA)?;
    a.mov(qword_ptr(rax + params::SEV_FEATURES as i32), r15)?;
    a.ret()?;

    // ---- write_vmsa(rdi = destination, rsi = APIC ID, rdx = generation); uses r15.
    //      Copies the whole template: the page may hold anything (an earlier VMSA, a
    //      request's GPA).
    a.set_label(&mut write_vmsa)?;
    a.mov(r10, rdi)?;
    a.mov(r9, rsi)?;
    a.mov(r11, rdx)?;
    a.mov(rsi, TEMPLATE_GPA)?;
    a.mov(ecx, TEMPLATE_QWORDS)?;
    a.cld()?;
    a.rep().movsq()?;
    a.jmp(patch_vmsa)?;

    // ---- write_fresh_vmsa(rdi = destination, a page never written since launch: zero; rsi,
    //      rdx as above): only the template's non-zero stretches.
    a.set_label(&mut write_fresh_vmsa)?;
    a.mov(r10, rdi)?;
    a.mov(r9, rsi)?;
    a.mov(r11, rdx)?;
    a.cld()?;
    for st in template_stretches() {
        let at = st.offset as i32;
        if st.qwords >= REP_MIN_QWORDS {
            a.lea(rdi, qword_ptr(r10 + at))?;
            a.mov(esi, TEMPLATE_GPA as u32 + st.offset)?;
            a.mov(ecx, st.qwords)?;
            a.rep().movsq()?;
        } else {
            for q in 0..st.qwords as i32 {
                a.mov(rax, qword_ptr(TEMPLATE_GPA as i32 + at + q * 8))?;
                a.mov(qword_ptr(r10 + at + q * 8), rax)?;
            }
        }
    }
    a.set_label(&mut patch_vmsa)?;
    a.mov(qword_ptr(r10 + 0x338), r9)?; // VMSA RDI
    a.mov(qword_ptr(r10 + 0x330), r11)?; // VMSA RSI
    a.mov(qword_ptr(r10 + 0x3b0), r15)?; // SEV_FEATURES
    a.ret()?;

    // ---- ghcb_call(rbx = exit_info_1, rbp = exit_info_2, rax = RAX, r8 = RAX valid)
    //      -> rax = sw_exit_info_1, rdx = sw_exit_info_2.
    a.set_label(&mut ghcb_call)?;
    a.mov(r9, GHCB_GPA)?;
    a.mov(qword_ptr(r9 + ghcb::RAX as i32), rax)?;
    a.mov(r10d, vmsa_core::ghcb::SVM_VMGEXIT_AP_CREATION as u32)?;
    a.mov(qword_ptr(r9 + ghcb::SW_EXIT_CODE as i32), r10)?;
    a.mov(qword_ptr(r9 + ghcb::SW_EXIT_INFO_1 as i32), rbx)?;
    a.mov(qword_ptr(r9 + ghcb::SW_EXIT_INFO_2 as i32), rbp)?;
    let mut rax_invalid = a.create_label();
    a.xor(r10d, r10d)?;
    a.test(r8, r8)?;
    a.jz(rax_invalid)?;
    a.mov(r10, ghcb::valid_bit(ghcb::RAX).1)?;
    a.set_label(&mut rax_invalid)?;
    a.mov(qword_ptr(r9 + ghcb::VALID_BITMAP as i32), r10)?;
    a.mov(
        r10,
        ghcb::valid_bit(ghcb::SW_EXIT_CODE).1
            | ghcb::valid_bit(ghcb::SW_EXIT_INFO_1).1
            | ghcb::valid_bit(ghcb::SW_EXIT_INFO_2).1,
    )?;
    a.mov(qword_ptr(r9 + (ghcb::VALID_BITMAP + 8) as i32), r10)?;
    a.mov(dword_ptr(r9 + ghcb::USAGE as i32), 0)?;
    a.mov(ecx, GHCB_MSR)?;
    a.mov(eax, GHCB_GPA as u32)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.mov(rax, qword_ptr(r9 + ghcb::SW_EXIT_INFO_1 as i32))?;
    a.mov(rdx, qword_ptr(r9 + ghcb::SW_EXIT_INFO_2 as i32))?;
    a.ret()?;

    let result = a.assemble_options(CODE_GPA, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let entries = [
        result.label_ip(&scenario)?,
        result.label_ip(&requests)?,
        result.label_ip(&ap)?,
        result.label_ip(&spin)?,
        result.label_ip(&igvm)?,
        result.label_ip(&halt)?,
    ];
    Ok((result.inner.code_buffer, entries))
}

/// Spin until the report counter reaches `target` (a register), yielding to the VMM through
/// [`ports::YIELD`] between looks.
/// `reg` = the address of request `r13` of the request table (32 bytes each).
fn request_entry(a: &mut CodeAssembler, reg: AsmRegister64) -> Result<(), IcedError> {
    a.mov(reg, r13)?;
    a.shl(reg, 5)?;
    a.add(reg, REQUESTS_GPA as i32)?;
    Ok(())
}

fn wait_counter(a: &mut CodeAssembler, target: AsmRegister64) -> Result<(), IcedError> {
    let mut again = a.create_label();
    let mut reached = a.create_label();
    a.set_label(&mut again)?;
    a.mov(rax, PARAMS_GPA)?;
    a.mov(rax, qword_ptr(rax + params::COUNTER as i32))?;
    a.cmp(rax, target)?;
    a.jae(reached)?;
    a.out(ports::YIELD as u32, al)?;
    a.jmp(again)?;
    a.set_label(&mut reached)?;
    Ok(())
}
