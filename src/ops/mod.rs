//! Operations: what an operator sees — health flags, Prometheus metrics,
//! the HTTP endpoint, status reports, systemd notifications.

pub mod dlq;
pub mod health;
pub mod heartbeat;
pub mod http;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod status;
pub mod systemd;
pub mod teardown;
pub mod token;
pub mod watchdog;
