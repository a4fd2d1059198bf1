//! Placeholder crate root; filled by the backend-kvm issue.
