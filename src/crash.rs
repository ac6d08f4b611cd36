//! Named crash points for the crash-recovery tests. With the `crash-points` feature, the process
//! aborts (as a SIGKILL would stop it) when it reaches the point named by `CELLAR_CRASH_AT`.
//! Without the feature this compiles to nothing.
//!
//! The crate's own unit tests can also arm a point for the calling thread only
//! ([`in_thread::crash_at`], [`in_thread::fail_at`]): reaching it then unwinds with [`Crashed`]
//! instead of aborting, so the in-process randomized tester can "kill" the engine mid-call, drop
//! it and open it again from disk, as a restarted driver would.

/// splitmix64: the seeded, dependency-free source of choices of both randomized crash testers
/// (`tests/random_crash.rs`, `src/node/random.rs`), identical on every run of a seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What a crash point armed in the calling thread unwinds with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crashed(pub String);

pub fn point(name: &str) {
    #[cfg(test)]
    in_thread::point(name);
    #[cfg(feature = "crash-points")]
    from_env::point(name);
    let _ = name;
}

/// A read of the file at `path` whole ([`crate::sys::files::Files::read_optional`]): where a unit
/// test holds the reads of one path, in whatever thread, as a share whose server is gone holds
/// them in the kernel ([`in_thread::hold_reads_of`]).
pub fn reading(path: &std::path::Path) {
    #[cfg(test)]
    in_thread::reading(path);
    let _ = path;
}

/// Named failure points for the fault tests: with the `crash-points` feature, `fail(name)` returns
/// the error named for it in `CELLAR_FAIL_AT` (`point=ERRNO[,point=ERRNO...]`, ERRNO one of ENOSPC,
/// EIO, EINTR, ENXIO, EDQUOT), every time it is reached once the CSI socket serves ([`serving`]),
/// so a test can play a full disk or a failing device at one step and see what the call leaves
/// (the start-up before it, which makes files and directories, is not failed). Without the
/// feature it is always Ok.
pub fn fail(name: &str) -> std::io::Result<()> {
    #[cfg(test)]
    in_thread::fail(name)?;
    #[cfg(feature = "crash-points")]
    from_env::fail(name)?;
    let _ = name;
    Ok(())
}

/// Named delay points for the race tests: with the `crash-points` feature, how long to wait at
/// `name` as `CELLAR_DELAY_AT` (`point=MILLISECONDS[,...]`) says, so that a test can hold a call
/// inside the window a race needs; zero otherwise. The caller waits (asynchronously where it runs
/// on the runtime).
pub fn delay(name: &str) -> std::time::Duration {
    #[cfg(feature = "crash-points")]
    return from_env::delay(name);
    #[cfg(not(feature = "crash-points"))]
    {
        let _ = name;
        std::time::Duration::ZERO
    }
}

/// The CSI socket serves from now on: the failures of `CELLAR_FAIL_AT` apply.
pub fn serving() {
    #[cfg(feature = "crash-points")]
    from_env::SERVING.store(true, std::sync::atomic::Ordering::SeqCst);
}

#[cfg(feature = "crash-points")]
mod from_env {
    pub static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    pub fn delay(name: &str) -> std::time::Duration {
        static AT: std::sync::OnceLock<Vec<(String, u64)>> = std::sync::OnceLock::new();
        let armed = AT.get_or_init(|| {
            std::env::var("CELLAR_DELAY_AT")
                .unwrap_or_default()
                .split(',')
                .filter_map(|p| p.split_once('='))
                .filter_map(|(point, ms)| Some((point.to_string(), ms.parse().ok()?)))
                .collect()
        });
        let ms = armed.iter().find(|(p, _)| p == name).map_or(0, |(_, ms)| *ms);
        std::time::Duration::from_millis(ms)
    }

    pub fn point(name: &str) {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if AT.get_or_init(|| std::env::var("CELLAR_CRASH_AT").ok()).as_deref() == Some(name) {
            eprintln!("crash point {name} reached: aborting");
            std::process::abort();
        }
    }

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
            Some((_, errno)) if SERVING.load(std::sync::atomic::Ordering::SeqCst) => {
                eprintln!("failure point {name} reached: failing with errno {errno}");
                Err(std::io::Error::from_raw_os_error(*errno))
            }
            _ => Ok(()),
        }
    }
}

/// Crash and failure points armed for one thread of the unit tests. An armed crash fires once (the
/// "restarted" engine must be able to pass the same point); an armed failure fires every time until
/// it is disarmed, as a full disk stays full.
#[cfg(test)]
pub mod in_thread {
    use std::cell::RefCell;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    use super::Crashed;

    /// A thread stopped at a crash point until another lets it go: the tester runs a second call
    /// in the window between two steps of the first.
    #[derive(Default)]
    pub struct Pause {
        /// 0 armed, 1 reached (the thread waits), 2 released.
        state: Mutex<u8>,
        turn: Condvar,
    }

    impl Pause {
        /// The paused thread's side: unless already released, says it is here and waits (a
        /// minute at most: a tester that never releases fails on its own, not by hanging).
        fn stop_here(&self) {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if *state == 0 {
                *state = 1;
                self.turn.notify_all();
                let _ = self
                    .turn
                    .wait_timeout_while(state, Duration::from_secs(60), |s| *s < 2)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }

        fn wait_for(&self, at_least: u8, timeout: Duration) -> bool {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (state, _) = self
                .turn
                .wait_timeout_while(state, timeout, |s| *s < at_least)
                .unwrap_or_else(|p| p.into_inner());
            *state >= at_least
        }

        /// Waits until the paused thread stands at its point: false when it has not come there
        /// within `timeout` (its call took another way, or ended before).
        pub fn reached(&self, timeout: Duration) -> bool {
            self.wait_for(1, timeout) && *self.state.lock().unwrap_or_else(|p| p.into_inner()) == 1
        }

        /// Lets the paused thread go on (or not stop at all, if it has not come yet).
        pub fn release(&self) {
            *self.state.lock().unwrap_or_else(|p| p.into_inner()) = 2;
            self.turn.notify_all();
        }
    }

    /// Reads held by [`hold_reads_of`].
    static HELD: Mutex<Vec<(std::path::PathBuf, Arc<Pause>)>> = Mutex::new(Vec::new());

    /// The first read of `path` from now on, in any thread, stops until `pause` is released (later
    /// ones go on): a share that hangs, for a thread the test does not start itself.
    pub fn hold_reads_of(path: &std::path::Path, pause: Arc<Pause>) {
        HELD.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((path.to_path_buf(), pause));
    }

    pub(super) fn reading(path: &std::path::Path) {
        let held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        let pause = held.iter().find(|(p, _)| p == path).map(|(_, pause)| pause.clone());
        drop(held);
        if let Some(pause) = pause {
            pause.stop_here();
        }
    }

    /// The next time this thread reaches `point`, it stops there until the pause is released.
    pub fn pause_at(point: Option<(&str, Arc<Pause>)>) {
        PAUSE_AT.with(|p| *p.borrow_mut() = point.map(|(n, pause)| (n.to_string(), pause)));
    }

    thread_local! {
        static PAUSE_AT: RefCell<Option<(String, Arc<Pause>)>> = const { RefCell::new(None) };
        static CRASH_AT: RefCell<Option<String>> = const { RefCell::new(None) };
        /// The point, its errno, whether it fires only once, and how many passes it lets by first.
        static FAIL_AT: RefCell<Option<(String, i32, bool, u32)>> = const { RefCell::new(None) };
    }

    /// The next time this thread reaches `point`, it unwinds with [`Crashed`].
    pub fn crash_at(point: Option<&str>) {
        CRASH_AT.with(|c| *c.borrow_mut() = point.map(str::to_string));
    }

    /// Every time this thread reaches the failure point `point`, it fails with `errno`.
    pub fn fail_at(point: Option<(&str, i32)>) {
        FAIL_AT.with(|f| *f.borrow_mut() = point.map(|(p, e)| (p.to_string(), e, false, 0)));
    }

    /// The next time this thread reaches the failure point `point`, it fails with `errno`; later
    /// passes succeed (a disk that failed one operation, as EIO on one rename).
    pub fn fail_once_at(point: &str, errno: i32) {
        fail_once_at_nth(point, 1, errno);
    }

    /// As [`fail_once_at`], at the `nth` pass of `point` (1 is the next).
    pub fn fail_once_at_nth(point: &str, nth: u32, errno: i32) {
        FAIL_AT.with(|f| *f.borrow_mut() = Some((point.to_string(), errno, true, nth.saturating_sub(1))));
    }

    /// Whether the crash armed for this thread has fired (and so is no longer armed).
    pub fn crash_fired() -> bool {
        CRASH_AT.with(|c| c.borrow().is_none())
    }

    pub(super) fn point(name: &str) {
        let pause = PAUSE_AT.with(|p| {
            let mut p = p.borrow_mut();
            match p.as_ref() {
                Some((n, _)) if n == name => p.take().map(|(_, pause)| pause),
                _ => None,
            }
        });
        if let Some(pause) = pause {
            pause.stop_here();
        }
        let fire = CRASH_AT.with(|c| {
            let mut c = c.borrow_mut();
            if c.as_deref() == Some(name) {
                *c = None;
                true
            } else {
                false
            }
        });
        if fire {
            std::panic::panic_any(Crashed(name.to_string()));
        }
    }

    pub(super) fn fail(name: &str) -> std::io::Result<()> {
        FAIL_AT.with(|f| {
            let mut f = f.borrow_mut();
            match f.as_mut() {
                Some((p, _, _, skip)) if p == name && *skip > 0 => {
                    *skip -= 1;
                    Ok(())
                }
                Some((p, errno, once, _)) if p == name => {
                    let e = std::io::Error::from_raw_os_error(*errno);
                    if *once {
                        *f = None;
                    }
                    Err(e)
                }
                _ => Ok(()),
            }
        })
    }

    /// Keeps the default panic message for every panic but a [`Crashed`] one, which the tester
    /// expects by the hundred.
    pub fn quiet_crashes() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if info.payload().downcast_ref::<Crashed>().is_none() {
                    previous(info);
                }
            }));
        });
    }
}
