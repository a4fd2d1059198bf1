//! Shared helpers of the real-KVM tests.

/// Whether /dev/kvm can be used; prints why not when it cannot (the only reason to skip).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}
