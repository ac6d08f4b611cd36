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
//! - each FIFREEZE runs on a thread of its own and is waited for only until the deadline
//!   ([`freeze_within`]): a workload can keep it waiting in the kernel for as long as it likes;
//! - each filesystem is frozen and thawed through one descriptor of its mountpoint, checked to be
//!   on the volume's device ([`crate::sys::filesystems::FrozenFs`]): a volume unmounted meanwhile
//!   is still thawed, and a plain directory left at its mountpoint is never frozen in its place.
//!
//! A filesystem that fails to freeze thaws the ones frozen before it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sys::filesystems::{Filesystems, FreezePoint};
use crate::sys::SysError;

use super::StorageError;

/// What thaws one frozen filesystem: it tries a few times ([`crate::sys::filesystems::thaw_persistently`]).
pub type Thawer = Box<dyn Fn() -> Result<(), SysError> + Send + Sync>;

/// Freezes one filesystem, answering what thaws it.
pub type FreezeFn<P> = dyn Fn(&P) -> Result<Thawer, SysError> + Send + Sync;

/// The freeze of `filesystems`: through the mountpoint's descriptor, thawed through the same one.
pub fn freezer(filesystems: &Arc<dyn Filesystems>) -> Arc<FreezeFn<FreezePoint>> {
    let filesystems = filesystems.clone();
    Arc::new(move |point: &FreezePoint| {
        let frozen = filesystems.freeze(point)?;
        let fs = filesystems.clone();
        let thaw: Thawer = Box::new(move || crate::sys::filesystems::thaw_persistently(fs.as_ref(), &frozen));
        Ok(thaw)
    })
}

/// Mountpoints whose FIFREEZE has been called and has not returned.
pub type InFlight = Arc<Mutex<HashSet<PathBuf>>>;

/// This process's freezes in flight.
pub fn in_flight() -> InFlight {
    static FLYING: std::sync::OnceLock<InFlight> = std::sync::OnceLock::new();
    FLYING.get_or_init(InFlight::default).clone()
}

/// What a freeze's thread and its caller share.
#[derive(Default)]
struct Handover {
    answer: Option<Result<Thawer, SysError>>,
    /// The caller stopped waiting: the thread thaws what it froze itself.
    abandoned: bool,
}

/// Freezes `point` on a thread of its own and waits for it until `deadline`.
///
/// FIFREEZE waits until the filesystem's writers are done, and a workload can keep a write going
/// for as long as it likes (a `splice` from an empty pipe into a file needs no privilege); the
/// call then sleeps in the kernel, where nothing can interrupt it. So the caller stops waiting at
/// the deadline (ABORTED, saying why), and the thread, when its freeze returns at last, thaws it
/// at once. One freeze per mountpoint is in flight at a time: another, while one still waits, is
/// ABORTED at once instead of leaving one more thread asleep.
pub fn freeze_within<P: AsRef<Path> + Clone + Send + 'static>(
    point: &P,
    deadline: Instant,
    freeze: &Arc<FreezeFn<P>>,
    flying: &InFlight,
) -> Result<Thawer, StorageError> {
    let mountpoint = point.as_ref().to_path_buf();
    {
        if !flying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mountpoint.clone())
        {
            return Err(StorageError::Aborted(format!(
                "an earlier freeze of the filesystem at {} has not returned yet: a writer keeps it \
                 busy (FIFREEZE waits for writes under way to finish); retry later",
                mountpoint.display()
            )));
        }
    }
    let shared = Arc::new((Mutex::new(Handover::default()), Condvar::new()));
    let (theirs, f, p, m) = (shared.clone(), freeze.clone(), point.clone(), mountpoint.clone());
    let landed = flying.clone();
    let started = std::thread::Builder::new().name("cellar-freeze".into()).spawn(move || {
        // Its place is given back however the freeze ends, a panic too: else that filesystem
        // could never be frozen again by this process.
        struct Landed(InFlight, PathBuf);
        impl Drop for Landed {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
            }
        }
        let landed = Landed(landed, m.clone());
        let answer = f(&p);
        drop(landed);
        let (lock, ready) = &*theirs;
        let mut h = lock.lock().unwrap_or_else(|p| p.into_inner());
        if !h.abandoned {
            h.answer = Some(answer);
            ready.notify_all();
            return;
        }
        drop(h);
        if let Ok(thaw) = answer {
            match thaw() {
                Ok(()) => tracing::warn!(mountpoint = %m.display(), "a freeze returned after its deadline; thawed it"),
                Err(e) => tracing::error!(mountpoint = %m.display(), error = %e, "a freeze returned after its deadline and could not be thawed"),
            }
        }
    });
    if let Err(e) = started {
        flying.lock().unwrap_or_else(|p| p.into_inner()).remove(&mountpoint);
        return Err(SysError::io("start a freeze", &mountpoint, e).into());
    }
    let (lock, ready) = &*shared;
    let mut h = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(answer) = h.answer.take() {
            return answer.map_err(StorageError::from);
        }
        let now = Instant::now();
        if now >= deadline {
            h.abandoned = true;
            return Err(StorageError::Aborted(format!(
                "the filesystem at {} did not freeze in time: a writer keeps it busy (FIFREEZE \
                 waits for writes under way to finish); it is thawed as soon as its freeze returns. \
                 Retry, or allow more time (parameter freezeTimeoutSeconds)",
                mountpoint.display()
            )));
        }
        h = ready
            .wait_timeout(h, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// What the cut and the watchdog share: the frozen filesystems (taken by whoever thaws first).
struct Frozen {
    mountpoints: Mutex<Vec<(PathBuf, Thawer)>>,
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
        for (m, thaw) in taken.into_iter().rev() {
            if let Err(e) = thaw() {
                tracing::error!(mountpoint = %m.display(), error = %e, "could not thaw after a group snapshot");
                if first.is_ok() {
                    first = Err(e);
                }
                stuck.push((m, thaw));
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
/// frozen (its thaw failed, or a freeze not yet returned may still freeze one: the caller keeps
/// its freeze mark for the next start).
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
    /// Freezes the filesystems at `points` for at most `within`.
    pub fn freeze(
        filesystems: &Arc<dyn Filesystems>,
        points: Vec<FreezePoint>,
        within: Duration,
    ) -> Result<Barrier, FreezeFailed> {
        Self::with(points, within, freezer(filesystems), in_flight())
    }

    fn with<P: AsRef<Path> + Clone + Send + 'static>(
        points: Vec<P>,
        within: Duration,
        freeze: Arc<FreezeFn<P>>,
        flying: InFlight,
    ) -> Result<Barrier, FreezeFailed> {
        let frozen = Arc::new(Frozen {
            mountpoints: Mutex::new(Vec::new()),
            expired: AtomicBool::new(false),
        });
        let any = !points.is_empty();
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
        for p in points {
            if barrier.frozen.expired() {
                break; // the watchdog already gave up; release() answers for it
            }
            let thaw = match freeze_within(&p, barrier.deadline, &freeze, &flying) {
                Ok(thaw) => thaw,
                Err(error) => {
                    barrier.stop_watchdog();
                    // A freeze given up on may still freeze its filesystem (and thaw it); until
                    // it has, a killed process leaves it frozen: the caller keeps its mark.
                    let abandoned = matches!(error, StorageError::Aborted(_));
                    let stuck = barrier.frozen.thaw_all().is_err() || abandoned;
                    return Err(FreezeFailed { error, stuck });
                }
            };
            barrier
                .frozen
                .mountpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((p.as_ref().to_path_buf(), thaw));
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

    /// A barrier over `points` frozen by `freeze` and thawed by `thaw` (each called once per try),
    /// with freezes in flight of its own.
    fn with_paths(
        points: Vec<PathBuf>,
        within: Duration,
        freeze: impl Fn(&Path) -> Result<(), SysError> + Send + Sync + 'static,
        thaw: impl Fn(&Path) -> Result<(), SysError> + Send + Sync + 'static,
    ) -> Result<Barrier, FreezeFailed> {
        Barrier::with(points, within, freeze_by(freeze, thaw), InFlight::default())
    }

    fn freeze_by(
        freeze: impl Fn(&Path) -> Result<(), SysError> + Send + Sync + 'static,
        thaw: impl Fn(&Path) -> Result<(), SysError> + Send + Sync + 'static,
    ) -> Arc<FreezeFn<PathBuf>> {
        let thaw = Arc::new(thaw);
        Arc::new(move |p: &PathBuf| {
            freeze(p)?;
            let (t, p) = (thaw.clone(), p.clone());
            let thawer: Thawer = Box::new(move || t(&p));
            Ok(thawer)
        })
    }

    fn points(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn release_within_the_deadline_thaws_every_filesystem_once() {
        let (frozen, freeze) = recorder();
        let (thawed, thaw) = recorder();
        let b = with_paths(points(&["/a", "/b"]), Duration::from_secs(3600), freeze, thaw).unwrap();
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
            let _b = with_paths(points(&["/a"]), Duration::from_secs(3600), freeze, thaw).unwrap();
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
        let r = with_paths(points(&["/a", "/b", "/c"]), Duration::from_secs(3600), freeze, thaw);
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
        let e = with_paths(points(&["/a", "/b"]), Duration::from_secs(3600), freeze, thaw)
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
        let b = with_paths(points(&["/a"]), Duration::from_millis(500), freeze, thaw).unwrap();
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
        let b = with_paths(points(&["/a"]), Duration::from_millis(500), freeze, thaw).unwrap();
        rx.recv().unwrap(); // the watchdog's thaw has begun
        let e = b.release().unwrap_err();
        assert!(matches!(e, StorageError::Sys(_)), "{e}");
    }

    #[test]
    fn a_freeze_that_ends_after_the_deadline_is_thawed_at_once() {
        // Each FIFREEZE takes far longer than the deadline (a workload keeps a write going): the
        // barrier stops waiting at the deadline, ABORTED, and whenever the freeze returns, nothing
        // it froze stays frozen.
        let (frozen, record) = recorder();
        let (thawed, thaw) = recorder();
        let (go, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let freeze = move |p: &Path| {
            let _ = wait.lock().unwrap().recv_timeout(Duration::from_secs(60));
            record(p)
        };
        let e = with_paths(points(&["/a", "/b"]), Duration::from_millis(50), freeze, thaw)
            .err()
            .expect("not frozen in time");
        assert!(matches!(e.error, StorageError::Aborted(_)), "{:?}", e.error);
        assert!(e.error.to_string().contains("did not freeze in time"), "{}", e.error);
        assert!(e.stuck, "a freeze may still land: the caller keeps its mark");
        assert!(
            frozen.lock().unwrap().is_empty(),
            "answered while the freeze still waits, not after it"
        );
        go.send(()).unwrap();
        let waited = Instant::now();
        while thawed.lock().unwrap().is_empty() && waited.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*frozen.lock().unwrap(), ["/a"], "the second was never asked for");
        assert_eq!(*thawed.lock().unwrap(), ["/a"], "the late freeze thawed itself");
    }

    #[test]
    fn one_freeze_of_a_filesystem_is_in_flight_at_a_time() {
        // A retry while an earlier freeze of the same filesystem still waits in the kernel is
        // refused at once, rather than leaving one more thread asleep per retry.
        let flying = InFlight::default();
        let (go, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let (_, thaw) = recorder();
        let freeze = freeze_by(
            move |_: &Path| {
                let _ = wait.lock().unwrap().recv_timeout(Duration::from_secs(60));
                Ok(())
            },
            thaw,
        );
        let a = PathBuf::from("/a");
        let soon = || Instant::now() + Duration::from_millis(50);
        assert!(freeze_within(&a, soon(), &freeze, &flying).is_err(), "held");
        let e = freeze_within(&a, soon(), &freeze, &flying).err().expect("refused");
        assert!(e.to_string().contains("has not returned yet"), "{e}");
        go.send(()).unwrap();
        let waited = Instant::now();
        while !flying.lock().unwrap().is_empty() && waited.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        go.send(()).unwrap();
        let thaw = freeze_within(&a, Instant::now() + Duration::from_secs(60), &freeze, &flying)
            .expect("frozen once the first returned");
        thaw().unwrap();
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
        let b = with_paths(points(&["/a"]), Duration::from_millis(500), freeze, thaw).unwrap();
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
        let b = with_paths(points(&["/a"]), Duration::from_secs(3600), freeze, thaw).unwrap();
        let e = b.release().unwrap_err();
        assert!(matches!(e, StorageError::Sys(_)), "{e}");
    }

    #[test]
    fn a_thaw_that_fails_once_is_tried_again() {
        use crate::sys::filesystems::{thaw_persistently, RecordingFilesystems};
        let fs = RecordingFilesystems::default();
        let frozen = fs
            .freeze(&FreezePoint {
                mountpoint: PathBuf::from("/m"),
                device: PathBuf::from("/dev/loop7"),
            })
            .unwrap();
        fs.fail_next("thaw", libc::EIO);
        thaw_persistently(&fs, &frozen).unwrap();
        assert!(fs.frozen().is_empty(), "thawed on the second try");
    }

    #[test]
    fn a_freeze_that_panics_gives_its_place_back() {
        let flying = InFlight::default();
        let (_, thaw) = recorder();
        let panics = freeze_by(|_: &Path| panic!("a freeze that panics"), thaw.clone());
        let a = PathBuf::from("/a");
        let soon = || Instant::now() + Duration::from_millis(300);
        assert!(freeze_within(&a, soon(), &panics, &flying).is_err());
        let waited = Instant::now();
        while !flying.lock().unwrap().is_empty() && waited.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let works = freeze_by(|_: &Path| Ok(()), thaw);
        let thawer = freeze_within(&a, Instant::now() + Duration::from_secs(60), &works, &flying)
            .expect("the filesystem can be frozen again");
        thawer().unwrap();
    }

    #[test]
    fn an_empty_barrier_has_no_deadline_to_miss() {
        let (_, freeze) = recorder();
        let (_, thaw) = recorder();
        let b = with_paths(Vec::new(), Duration::ZERO, freeze, thaw).unwrap();
        b.release().unwrap();
    }
}
