//! How the process uses memory, and the other resources the kernel counts per process.

/// Caps glibc's malloc arenas. glibc gives each thread that allocates concurrently an arena of its
/// own and keeps its high-water mark: with Tokio's blocking pool running disk calls on many
/// threads, the driver's RSS grew with the number of threads that ever ran at once (34 MiB beside
/// 1,000 published volumes at 8 clients, 17 MiB with one arena). Two arenas keep contention low.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets a tuning parameter of the allocator; it is called at start-up
    // before other threads exist.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// Raises the soft limit on open files to the hard limit, and answers the limit now in force.
/// A copy, a transfer or a backup restore walks a tenant's tree holding a few descriptors per
/// level, down to 1,000 levels; container runtimes start processes with a soft limit of 1,024, at
/// which one deep tree made the walk fail with EMFILE, and every other call of the process with
/// it while the walk held them. The hard limit is the runtime's word on what the driver may hold.
/// Capped at 2^20: the tools the driver runs (mkfs, mount, btrfs) inherit the limit, and some
/// close or poll every descriptor up to it, which `LimitNOFILE=infinity` would make endless.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const CAP: u64 = 1 << 20;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = hard.min(CAP).max(soft);
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    Ok(want)
}

/// Gives the pages of freed memory back to the kernel. glibc returns only the top of its heap on
/// its own: after a large transient structure (a full ListVolumes of a thousand nodes) is freed, the
/// holes it leaves stay resident, and the next one grows the heap again.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's free lists and advises the kernel that free
    // pages are unused; it takes the arenas' locks and is safe to call from any thread.
    let _ = unsafe { libc::malloc_trim(0) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit_within_its_cap() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let want = hard.min(1 << 20);
        // Just under what it is raised to: the other tests of this process never notice.
        setrlimit(Resource::RLIMIT_NOFILE, want - 1, hard).unwrap();
        assert_eq!(super::raise_open_file_limit().unwrap(), want);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (want, hard));
    }
}
