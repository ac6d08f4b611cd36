//! How the process uses memory.

/// Caps glibc's malloc arenas. glibc gives each thread that allocates concurrently an arena of its
/// own and keeps its high-water mark: with Tokio's blocking pool running disk calls on many
/// threads, the driver's RSS grew with the number of threads that ever ran at once (34 MiB beside
/// 1,000 published volumes at 8 clients, 17 MiB with one arena). Two arenas keep contention low.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets a tuning parameter of the allocator; it is called at start-up
    // before other threads exist.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// Gives the pages of freed memory back to the kernel. glibc returns only the top of its heap on
/// its own: after a large transient structure (a full ListVolumes of a thousand nodes) is freed, the
/// holes it leaves stay resident, and the next one grows the heap again.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's free lists and advises the kernel that free
    // pages are unused; it takes the arenas' locks and is safe to call from any thread.
    let _ = unsafe { libc::malloc_trim(0) };
}
