//! Allocator tuning for a long-running daemon.
//!
//! The sink builds and frees large buffers (an epoch's records, request
//! bodies) on several threads. With glibc's defaults, each thread grows its
//! own arena and the dynamic mmap threshold climbs, so freed buffers stay
//! in the heap as fragmentation and the resident size keeps the peak of
//! every burst. Two arenas and a fixed mmap threshold make large buffers
//! come from `mmap` and go back to the system when freed.

/// Applies the tuning (glibc only; a no-op elsewhere).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once at
    // start-up before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}
