//! Named crash points for the crash-recovery tests. With the `crash-points` feature, the process
//! aborts (as a SIGKILL would stop it) when it reaches the point named by `CELLAR_CRASH_AT`.
//! Without the feature this compiles to nothing.

#[cfg(feature = "crash-points")]
pub fn point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("CELLAR_CRASH_AT").ok()).as_deref() == Some(name) {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &str) {}
