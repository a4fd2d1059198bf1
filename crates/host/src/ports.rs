//! The I/O ports the built-in guests of every backend write to talk to the VMM (a debug-port
//! convention, like QEMU's isa-debug-exit).

/// "This vCPU is done" (the value: 0 for the BSP, the APIC ID for an AP). vCPU 0's write ends
/// the run.
pub const DONE: u16 = 0x10;
/// "Nothing to do; let other threads run" (a guest's wait loop).
pub const YIELD: u16 = 0x11;
/// "A step failed" (the value: the guest's step code).
pub const FAIL: u16 = 0x12;
