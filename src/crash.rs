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

/// Named failure points for the fault tests: with the `crash-points` feature, `fail(name)` returns
/// the error named for it in `CELLAR_FAIL_AT` (`point=ERRNO[,point=ERRNO...]`, ERRNO one of ENOSPC,
/// EIO, EINTR, ENXIO, EDQUOT), every time it is reached, so a test can play a full disk or a failing
/// device at one step and see what the call leaves. Without the feature it is always Ok.
#[cfg(feature = "crash-points")]
pub fn fail(name: &str) -> std::io::Result<()> {
    static AT: std::sync::OnceLock<Vec<(String, i32)>> = std::sync::OnceLock::new();
    let armed = AT.get_or_init(|| {
        let spec = std::env::var("CELLAR_FAIL_AT").unwrap_or_default();
        spec.split(',')
            .filter_map(|p| p.split_once('='))
            .filter_map(|(point, errno)| {
                let n = match errno {
                    "ENOSPC" => libc::ENOSPC,
                    "EIO" => libc::EIO,
                    "EINTR" => libc::EINTR,
                    "ENXIO" => libc::ENXIO,
                    "EDQUOT" => libc::EDQUOT,
                    _ => return None,
                };
                Some((point.to_string(), n))
            })
            .collect()
    });
    match armed.iter().find(|(p, _)| p == name) {
        Some((_, errno)) => {
            eprintln!("failure point {name} reached: failing with errno {errno}");
            Err(std::io::Error::from_raw_os_error(*errno))
        }
        None => Ok(()),
    }
}

#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn fail(_name: &str) -> std::io::Result<()> {
    Ok(())
}
