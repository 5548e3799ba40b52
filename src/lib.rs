//! cobi-sync: keeps the Cobi platform in sync with a partner's PostgreSQL
//! database.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//!  source (poll | replication) ──rows──▶ mapping ──records──▶ sink ──HTTP──▶ Cobi Data API
//!                 ▲                                            │
//!                 └──────── durable progress ◀── state ◀───────┘
//! ```
//!
//! - [`config`]: the configuration file → typed [`config::Settings`].
//! - [`model`]: Cobi record types (from the embedded schema.json), records,
//!   local validation.
//! - [`mapping`]: a source row → a Cobi record (pure).
//! - [`source`]: reading PostgreSQL (polling, logical replication, snapshots).
//! - [`mock_api`]: a strict local stand-in for the Cobi Data API (`cobi-sync mock-api`).

pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod mapping;
pub mod mock_api;
pub mod model;
pub mod ops;
pub mod pgtemp;
pub mod sink;
pub mod source;
pub mod state;
