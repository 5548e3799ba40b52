//! `cobi-sync demo`.

/// Placeholder until implemented.
pub async fn run() -> Result<(), u8> {
    eprintln!("demo: not implemented yet");
    Err(1)
}
