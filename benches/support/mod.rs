//! Helpers of the end-to-end benchmark (`benches/e2e.rs`).

pub mod partner;
pub mod poll_first_read;
pub mod proc;
pub mod purchase;
pub mod python;
pub mod receiver;
pub mod report;
