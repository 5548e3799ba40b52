//! Mapping: a source row → a Cobi record. Pure, no I/O.
//!
//! [`value`] is the one representation of a column value that both readers
//! feed ([`decode`] turns PostgreSQL's binary and text wire forms into it);
//! [`spec`] is the configuration's field specs; [`engine`] compiles a
//! mapping against a row layout and applies it.

pub mod decode;
pub mod engine;
pub mod spec;
pub mod time;
pub mod value;
