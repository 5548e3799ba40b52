//! The `cobi-sync` binary: everything lives in the library; see
//! [`cobi_sync::cli`].

/// jemalloc: sled's copy-on-write B-tree and the per-row records make
/// many small, short-lived allocations, where glibc's malloc took a third
/// of the daemon's CPU (measured with perf on a 1M-row snapshot).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc tuning, read at start-up: one arena (the daemon's work runs
/// on a few threads; more arenas kept more memory for no measured speed);
/// allocations of 1 MiB and more (request bodies, an epoch's vectors) in
/// jemalloc's oversize arena, whose freed pages go back to the system at
/// once; other freed pages after 0.3 s instead of 10 s. Measured: the
/// 200k-row transaction test peaks at 79 MiB (95–102 MiB with jemalloc's
/// defaults, 82 MiB with glibc); a 1M-row snapshot takes 4.1 CPU s
/// (jemalloc's defaults 3.6, glibc 5.9). `_RJEM_MALLOC_CONF` in the
/// environment overrides it.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static std::ffi::c_char> = Some(unsafe {
    // SAFETY: the first byte of a static NUL-terminated string.
    &*c"narenas:1,oversize_threshold:1048576,dirty_decay_ms:300,muzzy_decay_ms:0".as_ptr()
});

fn main() -> std::process::ExitCode {
    cobi_sync::cli::main()
}
