//! The `cobi-sync` binary: everything lives in the library; see
//! [`cobi_sync::cli`].

fn main() -> std::process::ExitCode {
    cobi_sync::ops::memory::tune_allocator();
    cobi_sync::cli::main()
}
