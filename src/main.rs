//! The `cobi-sync` binary: everything lives in the library; see
//! [`cobi_sync::cli`].

fn main() -> std::process::ExitCode {
    cobi_sync::cli::main()
}
