//! Placeholder crate root; filled by the backend-sim issue.
