//! Shared guest RAM on real KVM, backed by guest_memfd where this KVM has a mappable one and by
//! anonymous memory always: bounds, volatile copies and atomic 64-bit fields through
//! vm-memory's mapping, and the memslot released on drop.

use std::sync::Arc;

use backend_kvm::gmem::{GmemError, GuestRam, RamBacking};
use kvm_ioctls::Kvm;

#[test]
fn guest_ram_checks_bounds_and_reads_back_what_it_wrote() {
    let test = "guest_ram_checks_bounds_and_reads_back_what_it_wrote";
    if !backend_kvm::testing::kvm_or_skip(test) {
        return;
    }
    check(RamBacking::Anonymous);
    let here = backend_kvm::probe().image_ram;
    if here == Some(RamBacking::GuestMemfd) {
        check(RamBacking::GuestMemfd);
    } else {
        eprintln!("skipped {test} on guest_memfd: this KVM has no mappable guest_memfd ({here:?})");
    }
}

fn check(backing: RamBacking) {
    let vm = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
    let ram = GuestRam::new(vm.clone(), 0, 0x10_0000, 2 << 20, backing).unwrap();
    assert_eq!(ram.backing(), backing);
    assert_eq!((ram.gpa(), ram.size(), ram.slot()), (0x10_0000, 2 << 20, 0));
    // A copy across a page boundary reads back exactly.
    ram.write(0x10_0ffa, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    let mut b = [0u8; 9];
    ram.read(0x10_0ffa, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    // 64-bit fields are atomic and little-endian, and must be aligned.
    ram.write_u64(0x10_2000, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(ram.read_u64(0x10_2000).unwrap(), 0x1122_3344_5566_7788);
    let mut b = [0u8; 8];
    ram.read(0x10_2000, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
    assert_eq!(
        ram.read_u64(0x10_2001),
        Err(GmemError::Unaligned { offset: 0x10_2001 })
    );
    // Nothing below, across or past the slot, and no overflow.
    let end = 0x10_0000 + (2 << 20);
    assert!(matches!(
        ram.read(0xf_fff8, &mut [0u8; 8]),
        Err(GmemError::OutOfRange { .. })
    ));
    assert!(matches!(
        ram.write(end - 4, &[0u8; 8]),
        Err(GmemError::OutOfRange { .. })
    ));
    assert!(matches!(ram.read_u64(end), Err(GmemError::OutOfRange { .. })));
    assert!(ram.write(u64::MAX, &[0]).is_err());
    assert_eq!(
        GuestRam::new(vm.clone(), 1, 0x1000_0000, 100, backing).unwrap_err(),
        GmemError::BadSize { size: 100 }
    );
    // Dropping the RAM deletes the memslot, so the same slot and range can be added again.
    drop(ram);
    GuestRam::new(vm, 0, 0x10_0000, 2 << 20, backing).unwrap();
}
