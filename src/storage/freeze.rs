//! The freeze barrier of a group snapshot: every filesystem of the group is frozen (FIFREEZE)
//! before any member is cut and thawed after the last one, so the members hold one point in time.
//!
//! A frozen filesystem stops its writers, so the freeze is bounded whatever happens to the caller:
//! - dropping the barrier thaws (also on an error or a panic unwinding through the cut);
//! - a watchdog thread thaws at the deadline even while the cut is still running (a copy that
//!   hangs, a controller that went away: the node thaws on its own);
//! - [`Barrier::release`] says whether the cut finished within the deadline. One that did not is
//!   not one point in time any more (the watchdog let writes through mid-cut): the caller drops
//!   what it cut and answers ABORTED, and the retry starts over.
//!
//! A filesystem that fails to freeze thaws the ones frozen before it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sys::filesystems::Filesystems;
use crate::sys::SysError;

use super::StorageError;

type Thaw = dyn Fn(&Path) -> Result<(), SysError> + Send + Sync;

/// What the cut and the watchdog share: the frozen filesystems (taken by whoever thaws first).
struct Frozen {
    mountpoints: Mutex<Vec<PathBuf>>,
    thaw: Box<Thaw>,
    /// The watchdog thawed: the deadline passed before the cut ended.
    expired: AtomicBool,
}

impl Frozen {
    /// Thaws every filesystem frozen (each tried a few times); the first that stayed frozen.
    /// Those stay in the list: whoever thaws next (the cut's release after the watchdog) tries
    /// them again and answers that they stayed frozen, so the caller keeps its freeze mark.
    fn thaw_all(&self) -> Result<(), SysError> {
        let taken = std::mem::take(&mut *self.mountpoints.lock().unwrap_or_else(|p| p.into_inner()));
        let mut first = Ok(());
        let mut stuck = Vec::new();
        for m in taken.into_iter().rev() {
            if let Err(e) = (self.thaw)(&m) {
                tracing::error!(mountpoint = %m.display(), error = %e, "could not thaw after a group snapshot");
                if first.is_ok() {
                    first = Err(e);
                }
                stuck.push(m);
            }
        }
        stuck.reverse();
        self.mountpoints.lock().unwrap_or_else(|p| p.into_inner()).extend(stuck);
        first
    }

    fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }
}

/// A barrier that could not freeze everything: why, and whether a filesystem it froze stayed
/// frozen (its thaw failed: the caller keeps its freeze mark for the next start).
#[derive(Debug)]
pub struct FreezeFailed {
    pub error: StorageError,
    pub stuck: bool,
}

/// Filesystems frozen together until released, dropped, or their deadline.
pub struct Barrier {
    frozen: Arc<Frozen>,
    /// Dropped to stop the watchdog.
    stop: Option<mpsc::Sender<()>>,
    /// The watchdog, joined before the barrier thaws: a thaw it is still trying puts what stayed
    /// frozen back in the list only when it ends, and that must be seen.
    watchdog: Option<std::thread::JoinHandle<()>>,
    deadline: Instant,
    within: Duration,
    /// Something was frozen (an empty barrier has no deadline to miss).
    any: bool,
}

impl Barrier {
    /// Freezes the filesystems mounted at `mountpoints` for at most `within`.
    pub fn freeze(
        filesystems: &Arc<dyn Filesystems>,
        mountpoints: Vec<PathBuf>,
        within: Duration,
    ) -> Result<Barrier, FreezeFailed> {
        let thawing = filesystems.clone();
        Self::with(
            mountpoints,
            within,
            |m| filesystems.freeze(m),
            move |m| crate::sys::filesystems::thaw_persistently(thawing.as_ref(), m),
        )
    }

    fn with(
        mountpoints: Vec<PathBuf>,
        within: Duration,
        freeze: impl Fn(&Path) -> Result<(), SysError>,
        thaw: impl Fn(&Path) -> Result<(), SysError> + Send + Sync + 'static,
    ) -> Result<Barrier, FreezeFailed> {
        let frozen = Arc::new(Frozen {
            mountpoints: Mutex::new(Vec::new()),
            thaw: Box::new(thaw),
            expired: AtomicBool::new(false),
        });
        let any = !mountpoints.is_empty();
        let (tx, rx) = mpsc::channel::<()>();
        let mut watchdog = None;
        if any {
            let watched = frozen.clone();
            let started = std::thread::Builder::new()
                .name("cellar-thaw".into())
                .spawn(move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(within) {
                        watched.expired.store(true, Ordering::Release);
                        tracing::warn!(
                            seconds = within.as_secs_f64(),
                            "a group snapshot kept its filesystems frozen past its deadline; thawing them"
                        );
                        let _ = watched.thaw_all();
                    }
                })
                .map_err(|e| FreezeFailed {
                    error: SysError::io("start the thaw watchdog", "", e).into(),
                    stuck: false,
                })?;
            watchdog = Some(started);
        }
        // Built before the first freeze: an error below drops it, which thaws what was frozen.
        let mut barrier = Barrier {
            frozen,
            stop: Some(tx),
            watchdog,
            deadline: Instant::now() + within,
            within,
            any,
        };
        for m in mountpoints {
            if barrier.frozen.expired() {
                break; // the watchdog already gave up; release() answers for it
            }
            if let Err(e) = freeze(&m) {
                barrier.stop_watchdog();
                let stuck = barrier.frozen.thaw_all().is_err();
                return Err(FreezeFailed { error: e.into(), stuck });
            }
            barrier
                .frozen
                .mountpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(m);
            // A freeze still running when the watchdog thawed (FIFREEZE flushes dirty data, and
            // may take long) was not in its list: thawed here, not left frozen until the release.
            if barrier.frozen.expired() {
                let _ = barrier.frozen.thaw_all();
                break;
            }
        }
        Ok(barrier)
    }

    /// Whether the deadline passed and the watchdog thawed: a cut still to make is not one point
    /// in time any more.
    pub fn expired(&self) -> bool {
        self.frozen.expired()
    }

    /// Thaws now; `Err(Aborted)` when the deadline passed first (the members are not one point in
    /// time: the caller drops them), and the thaw's error when a filesystem stayed frozen (the
    /// caller keeps its freeze mark, so the next start thaws it).
    pub fn release(mut self) -> Result<(), StorageError> {
        self.stop_watchdog();
        if let Err(e) = self.frozen.thaw_all() {
            return Err(StorageError::Sys(e));
        }
        let late = self.frozen.expired() || Instant::now() >= self.deadline;
        if self.any && late {
            return Err(StorageError::Aborted(format!(
                "the group's filesystems were frozen for longer than the {} s allowed \
                 (parameter freezeTimeoutSeconds); they were thawed and no snapshot was kept: retry, \
                 or allow more time (copies of image volumes are fast on pools with reflinks: xfs, btrfs)",
                self.within.as_secs()
            )));
        }
        Ok(())
    }
}

impl Barrier {
    /// Stops the watchdog, and waits for a thaw it is doing to end.
    fn stop_watchdog(&mut self) {
        self.stop.take();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Barrier {
    fn drop(&mut self) {
        self.stop_watchdog();
        let _ = self.frozen.thaw_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Log = Arc<Mutex<Vec<String>>>;

    /// A freeze or thaw that only writes down the mountpoints it is asked for.
    fn recorder() -> (Log, impl Fn(&Path) -> Result<(), SysError> + Send + Sync + Clone) {
        let log = Log::default();
        let l = log.clone();
        (log, move |p: &Path| {
            l.lock().unwrap().push(p.display().to_string());
            Ok(())
        })
    }

    /// A freeze or thaw of `p` that fails with `errno`.
    fn refused(op: &'static str, p: &Path, errno: i32) -> Result<(), SysError> {
        Err(SysError::io(op, p, std::io::Error::from_raw_os_error(errno)))
    }

    fn points(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn release_within_the_deadline_thaws_every_filesystem_once() {
        let (frozen, freeze) = recorder();
        let (thawed, thaw) = recorder();
        let b = Barrier::with(points(&["/a", "/b"]), Duration::from_secs(3600), freeze, thaw).unwrap();
        assert_eq!(*frozen.lock().unwrap(), ["/a", "/b"]);
        assert!(thawed.lock().unwrap().is_empty());
        b.release().unwrap();
        assert_eq!(*thawed.lock().unwrap(), ["/b", "/a"]);
    }

    #[test]
    fn drop_thaws_as_an_error_or_panic_unwinds() {
        let (_, freeze) = recorder();
        let (thawed, thaw) = recorder();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _b = Barrier::with(points(&["/a"]), Duration::from_secs(3600), freeze, thaw).unwrap();
            panic!("a cut that panics");
        }));
        assert!(r.is_err());
        assert_eq!(*thawed.lock().unwrap(), ["/a"]);
    }

    #[test]
    fn a_freeze_that_fails_thaws_the_ones_before_it() {
        let (thawed, thaw) = recorder();
        let freeze = |p: &Path| {
            if p == Path::new("/b") {
                refused("freeze (FIFREEZE)", p, libc::EBUSY)
            } else {
                Ok(())
            }
        };
        let r = Barrier::with(points(&["/a", "/b", "/c"]), Duration::from_secs(3600), freeze, thaw);
        let e = r.err().expect("a freeze failed");
        assert!(!e.stuck, "everything frozen was thawed");
        assert_eq!(*thawed.lock().unwrap(), ["/a"]);
    }

    #[test]
    fn a_failed_freeze_whose_thaw_fails_says_so() {
        let freeze = |p: &Path| match p == Path::new("/b") {
            true => refused("freeze (FIFREEZE)", p, libc::EBUSY),
            false => Ok(()),
        };
        let thaw = |p: &Path| refused("thaw (FITHAW)", p, libc::EIO);
        let e = Barrier::with(points(&["/a", "/b"]), Duration::from_secs(3600), freeze, thaw)
            .err()
            .expect("a freeze failed");
        assert!(e.stuck, "/a stayed frozen: the caller keeps its mark");
    }

    #[test]
    fn a_watchdog_thaw_that_failed_is_the_answer_of_release() {
        // The watchdog's thaw fails; the release must not answer only "too late" (which would
        // have the caller drop its freeze mark), but that a filesystem stayed frozen.
        let (_, freeze) = recorder();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let thaw = move |p: &Path| {
            let _ = tx.lock().unwrap().send(p.to_path_buf());
            refused("thaw (FITHAW)", p, libc::EIO)
        };
        let b = Barrier::with(points(&["/a"]), Duration::from_millis(1), freeze, thaw).unwrap();
        assert_eq!(rx.recv().unwrap(), PathBuf::from("/a"), "the watchdog tried");
        let e = b.release().unwrap_err();
        assert!(matches!(e, StorageError::Sys(_)), "{e}");
        assert_eq!(rx.recv().unwrap(), PathBuf::from("/a"), "the release tried again");
    }

    #[test]
    fn a_release_waits_for_a_watchdog_thaw_still_under_way() {
        // The watchdog's thaw takes a while and fails: a release that came meanwhile found an
        // empty list, answered "too late" only, and the caller removed its freeze mark.
        let (_, freeze) = recorder();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let thaw = move |p: &Path| {
            let _ = tx.lock().unwrap().send(());
            std::thread::sleep(Duration::from_millis(200));
            refused("thaw (FITHAW)", p, libc::EIO)
        };
        let b = Barrier::with(points(&["/a"]), Duration::from_millis(1), freeze, thaw).unwrap();
        rx.recv().unwrap(); // the watchdog's thaw has begun
        let e = b.release().unwrap_err();
        assert!(matches!(e, StorageError::Sys(_)), "{e}");
    }

    #[test]
    fn a_freeze_that_ends_after_the_watchdog_thawed_is_thawed_at_once() {
        // Each FIFREEZE takes far longer than the deadline: the watchdog fires while one still
        // runs, when its list does not hold that filesystem yet. Whenever it fires, nothing the
        // barrier froze may stay frozen after it (until the release, minutes later).
        let (frozen, record) = recorder();
        let (thawed, thaw) = recorder();
        let freeze = move |p: &Path| {
            std::thread::sleep(Duration::from_millis(300));
            record(p)
        };
        let b = Barrier::with(points(&["/a", "/b"]), Duration::from_millis(50), freeze, thaw).unwrap();
        let waited = Instant::now();
        while !b.expired() && waited.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(b.expired(), "the watchdog fired");
        let thawed = thawed.lock().unwrap().clone();
        for m in frozen.lock().unwrap().iter() {
            assert!(thawed.contains(m), "{m} stayed frozen after the deadline: {thawed:?}");
        }
        assert!(matches!(b.release(), Err(StorageError::Aborted(_))));
    }

    #[test]
    fn the_watchdog_thaws_at_the_deadline_and_the_cut_is_aborted() {
        let (_, freeze) = recorder();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let thaw = move |p: &Path| {
            let _ = tx.lock().unwrap().send(p.to_path_buf());
            Ok(())
        };
        let b = Barrier::with(points(&["/a"]), Duration::from_millis(1), freeze, thaw).unwrap();
        // The cut is still running: the watchdog thaws without being asked.
        assert_eq!(rx.recv().unwrap(), PathBuf::from("/a"));
        let e = b.release().unwrap_err();
        assert!(matches!(e, StorageError::Aborted(_)), "{e}");
        assert!(rx.try_recv().is_err(), "thawed once only");
    }

    #[test]
    fn a_thaw_that_keeps_failing_is_the_answer_of_release() {
        let (_, freeze) = recorder();
        let thaw = |p: &Path| refused("thaw (FITHAW)", p, libc::EIO);
        let b = Barrier::with(points(&["/a"]), Duration::from_secs(3600), freeze, thaw).unwrap();
        let e = b.release().unwrap_err();
        assert!(matches!(e, StorageError::Sys(_)), "{e}");
    }

    #[test]
    fn a_thaw_that_fails_once_is_tried_again() {
        use crate::sys::filesystems::{thaw_persistently, RecordingFilesystems};
        let fs = RecordingFilesystems::default();
        fs.freeze(Path::new("/m")).unwrap();
        fs.fail_next("thaw", libc::EIO);
        thaw_persistently(&fs, Path::new("/m")).unwrap();
        assert!(fs.frozen().is_empty(), "thawed on the second try");
    }

    #[test]
    fn an_empty_barrier_has_no_deadline_to_miss() {
        let (_, freeze) = recorder();
        let (_, thaw) = recorder();
        let b = Barrier::with(Vec::new(), Duration::ZERO, freeze, thaw).unwrap();
        b.release().unwrap();
    }
}
