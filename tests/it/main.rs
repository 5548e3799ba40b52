//! Integration tests: one test binary (link once), one module per area.
//! Every test uses a real PostgreSQL started from initdb in a temp dir, and
//! the project's own mock API over real HTTP.

mod badinput;
mod chaos;
mod check;
mod common;
mod config_cli;
mod demo;
mod features;
mod ops;
mod ops_reload;
mod oracle;
mod packaging;
mod partner;
mod poll;
mod poll_safety;
mod repl_edges;
mod replication;
mod shaped;
mod sink;
mod sink_edges;
mod snapshot;
mod state;
mod tls;
mod types;
