//! backend-sim: a cycle-approximate software SEV-SNP machine implementing vmsa-core's
//! `Platform`. (The machine itself arrives with its issue; the measurement is here first
//! because the VMM's `measure` command shares it.)

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod measure;
