//! Operations: what an operator sees — health flags, Prometheus metrics,
//! the HTTP endpoint, status reports, systemd notifications.

pub mod health;
pub mod metrics;
