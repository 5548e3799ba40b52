//! `cobi-sync check`.

/// Runs every check; placeholder until implemented.
pub async fn run(path: &std::path::Path) -> Result<(), u8> {
    let _ = crate::config::load(path).map_err(|e| {
        eprint!("{e}");
        2u8
    })?;
    println!("ok   configuration");
    Ok(())
}
