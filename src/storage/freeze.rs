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
    fn thaw_all(&self) -> Result<(), SysError> {
        let taken = std::mem::take(&mut *self.mountpoints.lock().unwrap_or_else(|p| p.into_inner()));
        let mut first = Ok(());
        for m in taken.iter().rev() {
            if let Err(e) = (self.thaw)(m) {
                tracing::error!(mountpoint = %m.display(), error = %e, "could not thaw after a group snapshot");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// Filesystems frozen together until released, dropped, or their deadline.
pub struct Barrier {
    frozen: Arc<Frozen>,
    /// Dropped to stop the watchdog.
    stop: Option<mpsc::Sender<()>>,
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
    ) -> Result<Barrier, StorageError> {
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
    ) -> Result<Barrier, StorageError> {
        let frozen = Arc::new(Frozen {
            mountpoints: Mutex::new(Vec::new()),
            thaw: Box::new(thaw),
            expired: AtomicBool::new(false),
        });
        let any = !mountpoints.is_empty();
        let (tx, rx) = mpsc::channel::<()>();
        if any {
            let watched = frozen.clone();
            std::thread::Builder::new()
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
                .map_err(|e| SysError::io("start the thaw watchdog", "", e))?;
        }
        // Built before the first freeze: an error below drops it, which thaws what was frozen.
        let barrier = Barrier {
            frozen,
            stop: Some(tx),
            deadline: Instant::now() + within,
            within,
            any,
        };
        for m in mountpoints {
            if barrier.frozen.expired.load(Ordering::Acquire) {
                break; // the watchdog already gave up; release() answers for it
            }
            freeze(&m)?;
            barrier
                .frozen
                .mountpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(m);
        }
        Ok(barrier)
    }

    /// Thaws now; `Err(Aborted)` when the deadline passed first (the members are not one point in
    /// time: the caller drops them), and the thaw's error when a filesystem stayed frozen (the
    /// caller keeps its freeze mark, so the next start thaws it).
    pub fn release(mut self) -> Result<(), StorageError> {
        self.stop.take();
        if let Err(e) = self.frozen.thaw_all() {
            return Err(StorageError::Sys(e));
        }
        let late = self.frozen.expired.load(Ordering::Acquire) || Instant::now() >= self.deadline;
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

impl Drop for Barrier {
    fn drop(&mut self) {
        self.stop.take();
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
                Err(SysError::io(
                    "freeze (FIFREEZE)",
                    p,
                    std::io::Error::from_raw_os_error(libc::EBUSY),
                ))
            } else {
                Ok(())
            }
        };
        let r = Barrier::with(points(&["/a", "/b", "/c"]), Duration::from_secs(3600), freeze, thaw);
        assert!(r.is_err());
        assert_eq!(*thawed.lock().unwrap(), ["/a"]);
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
        let thaw = |p: &Path| {
            Err(SysError::io(
                "thaw (FITHAW)",
                p,
                std::io::Error::from_raw_os_error(libc::EIO),
            ))
        };
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
