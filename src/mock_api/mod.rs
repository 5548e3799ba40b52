//! Placeholder until the mock API lands.
#![allow(missing_docs)]
#[derive(Debug, Clone)]
pub struct MockOptions {
    pub listen: std::net::SocketAddr,
    pub api_key: String,
    pub fail_rate: f64,
    pub throttle_rate: f64,
    pub drop_rate: f64,
    pub latency: std::time::Duration,
    pub seed: u64,
}
pub async fn serve_until_signal(_opts: MockOptions) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
