//! The Cobi Data API's side of the pipeline: record types from the embedded
//! `schema.json`, the record value, and local validation.
//!
//! This module knows nothing about PostgreSQL or HTTP.

pub mod record;
pub mod schema;
pub mod validate;

pub use record::{Json, Record};
pub use schema::{schema, FieldId, TypeId};
