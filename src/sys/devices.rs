//! Block devices behind one seam: loop devices over image files and the filesystem tools that
//! grow what is on them, at the grain of single operations, so the node's image logic (stage,
//! unstage, expand, stats) can be driven by a recording fake ([`RecordingDevices`]) without root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::fstools::{self, FsType};
use super::loopdev::{self, LoopDevice};
use super::{Recorded, SysError};

pub trait Devices: Send + Sync {
    /// The loop devices attached to `backing`.
    fn find_by_backing(&self, backing: &Path) -> Result<Vec<LoopDevice>, SysError>;
    /// Attaches a new loop device to `backing`; whether direct I/O is on.
    fn attach(&self, backing: &Path, read_only: bool) -> Result<(LoopDevice, bool), SysError>;
    fn detach(&self, device: &LoopDevice) -> Result<(), SysError>;
    /// Whether the kernel refuses writes through the device.
    fn is_read_only(&self, device: &LoopDevice) -> Result<bool, SysError>;
    /// Makes the device take its backing file's current size.
    fn refresh_capacity(&self, device: &LoopDevice) -> Result<(), SysError>;
    /// The size in bytes of a block device.
    fn size(&self, device: &Path) -> Result<u64, SysError>;
    /// Grows the unmounted filesystem on `device` to the device's size.
    fn grow_offline(&self, fs: FsType, device: &Path) -> Result<(), SysError>;
    /// Grows the filesystem on `device`, mounted at `mountpoint`, to the device's size.
    fn grow_online(&self, fs: FsType, device: &Path, mountpoint: &Path) -> Result<(), SysError>;
    /// Checks the unmounted filesystem on `device` without repairing it (`replay`: an ext4
    /// journal may be replayed first): [`fstools::check`].
    fn check(&self, fs: FsType, device: &Path, replay: bool) -> Result<fstools::Checked, SysError>;
}

/// The real thing: loop ioctls and the filesystems' own tools.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxDevices;

impl Devices for LinuxDevices {
    fn find_by_backing(&self, backing: &Path) -> Result<Vec<LoopDevice>, SysError> {
        loopdev::find_by_backing(backing)
    }
    fn attach(&self, backing: &Path, read_only: bool) -> Result<(LoopDevice, bool), SysError> {
        loopdev::attach(backing, read_only, true)
    }
    fn detach(&self, device: &LoopDevice) -> Result<(), SysError> {
        loopdev::detach(device)
    }
    fn is_read_only(&self, device: &LoopDevice) -> Result<bool, SysError> {
        loopdev::is_read_only(device)
    }
    fn refresh_capacity(&self, device: &LoopDevice) -> Result<(), SysError> {
        loopdev::refresh_capacity(device)
    }
    fn size(&self, device: &Path) -> Result<u64, SysError> {
        loopdev::device_size(device)
    }
    fn grow_offline(&self, fs: FsType, device: &Path) -> Result<(), SysError> {
        fstools::grow_offline(fs, device)
    }
    fn grow_online(&self, fs: FsType, device: &Path, mountpoint: &Path) -> Result<(), SysError> {
        fstools::grow_online(fs, device, mountpoint)
    }
    fn check(&self, fs: FsType, device: &Path, replay: bool) -> Result<fstools::Checked, SysError> {
        fstools::check(fs, device, replay)
    }
}

/// Devices that exist only in memory: each attach makes a `/dev/loopN` that "exists" until it is
/// detached or made to vanish; every call is recorded; the next call of an operation can be made to
/// fail with an errno. For unit tests of the logic above `sys`.
#[derive(Debug, Default)]
pub struct RecordingDevices {
    state: Recorded<DeviceState>,
}

#[derive(Debug, Default)]
struct DeviceState {
    /// Device number to backing file.
    attached: BTreeMap<u32, PathBuf>,
    /// The devices attached read-only.
    read_only: std::collections::BTreeSet<u32>,
    /// How many of the next checks find a dirty log (see [`RecordingDevices::dirty_logs`]).
    dirty_logs: usize,
    /// Since a reboot with a seed: numbers come in an order of their own (as when other software
    /// on the machine takes and gives back loop devices), from this generator's state.
    scramble: Option<u64>,
}

impl RecordingDevices {
    pub fn calls(&self) -> Vec<String> {
        self.state.calls()
    }

    /// The backing files with a device attached, one entry per device.
    pub fn attached(&self) -> Vec<PathBuf> {
        self.state.lock().attached.values().cloned().collect()
    }

    /// The next call of `op` ("attach", "detach", "find", "refresh", "size", "grow-offline",
    /// "grow-online") fails with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        self.state.fail_next(op, errno);
    }

    /// Forgets every failure armed with `fail_next` and not yet reached.
    pub fn disarm(&self) {
        self.state.disarm();
    }

    /// The next `n` checks find the filesystem's journal or log dirty (a crash-consistent copy),
    /// the ones after find it clean. A check can be made to fail with `fail_next("check", ..)`.
    pub fn dirty_logs(&self, n: usize) {
        self.state.lock().dirty_logs = n;
    }

    /// The device over `backing` disappears, as when someone ran `losetup -d` behind our back.
    pub fn vanish(&self, backing: &Path) {
        self.state.lock().attached.retain(|_, b| b != backing);
    }

    /// Every device is gone, as after a reboot. With a seed, the numbers attaches get from now
    /// on are scrambled (deterministically from it), so that a number recorded before the reboot
    /// can come back as any device's.
    pub fn reboot(&self, scramble: Option<u64>) {
        let mut s = self.state.lock();
        s.attached.clear();
        s.read_only.clear();
        s.scramble = scramble.map(|x| x | 1);
    }
}

impl Devices for RecordingDevices {
    fn find_by_backing(&self, backing: &Path) -> Result<Vec<LoopDevice>, SysError> {
        let s = self
            .state
            .enter("find", format!("find {}", backing.display()), backing)?;
        Ok(s.attached
            .iter()
            .filter(|(_, b)| b.as_path() == backing)
            .map(|(n, _)| LoopDevice::new(*n))
            .collect())
    }
    fn attach(&self, backing: &Path, read_only: bool) -> Result<(LoopDevice, bool), SysError> {
        let mut s = self.state.enter(
            "attach",
            format!("attach {} ro={read_only}", backing.display()),
            backing,
        )?;
        // As the real attach, which opens the backing file first.
        if !backing.is_file() {
            return Err(SysError::io(
                "open backing file",
                backing,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        // As the kernel's LOOP_CTL_GET_FREE: the lowest number free, so numbers are reused; after
        // a scrambling reboot one of the four lowest free.
        let skip = match s.scramble.as_mut() {
            None => 0,
            Some(x) => {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                (*x % 4) as usize
            }
        };
        let n = (0..)
            .filter(|n| !s.attached.contains_key(n))
            .nth(skip)
            .unwrap_or_default();
        s.attached.insert(n, backing.to_path_buf());
        match read_only {
            true => s.read_only.insert(n),
            false => s.read_only.remove(&n),
        };
        Ok((LoopDevice::new(n), true))
    }
    fn detach(&self, device: &LoopDevice) -> Result<(), SysError> {
        // As the real detach: a device already gone is fine.
        let mut s = self
            .state
            .enter("detach", format!("detach {}", device.path.display()), &device.path)?;
        s.attached.remove(&device.number);
        s.read_only.remove(&device.number);
        Ok(())
    }
    fn is_read_only(&self, device: &LoopDevice) -> Result<bool, SysError> {
        let s = self
            .state
            .enter("ro", format!("ro {}", device.path.display()), &device.path)?;
        match s.attached.contains_key(&device.number) {
            true => Ok(s.read_only.contains(&device.number)),
            false => Err(SysError::io(
                "read loop ro flag",
                &device.path,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )),
        }
    }
    fn refresh_capacity(&self, device: &LoopDevice) -> Result<(), SysError> {
        let s = self
            .state
            .enter("refresh", format!("refresh {}", device.path.display()), &device.path)?;
        match s.attached.contains_key(&device.number) {
            true => Ok(()),
            false => Err(SysError::io(
                "refresh loop capacity",
                &device.path,
                std::io::Error::from_raw_os_error(libc::ENXIO),
            )),
        }
    }
    fn size(&self, device: &Path) -> Result<u64, SysError> {
        let s = self.state.enter("size", format!("size {}", device.display()), device)?;
        let backing = s
            .attached
            .iter()
            .find(|(n, _)| LoopDevice::new(**n).path == device)
            .map(|(_, b)| b.clone());
        drop(s);
        match backing {
            Some(b) => std::fs::metadata(&b)
                .map(|m| m.len())
                .map_err(|e| SysError::io("stat", &b, e)),
            None => Err(SysError::io(
                "device size",
                device,
                std::io::Error::from_raw_os_error(libc::ENXIO),
            )),
        }
    }
    fn grow_offline(&self, fs: FsType, device: &Path) -> Result<(), SysError> {
        self.state
            .enter(
                "grow-offline",
                format!("grow-offline {} {}", fs.as_str(), device.display()),
                device,
            )
            .map(|_| ())
    }
    fn check(&self, fs: FsType, device: &Path, replay: bool) -> Result<fstools::Checked, SysError> {
        let mut s = self.state.enter(
            "check",
            format!("check {} {} replay={replay}", fs.as_str(), device.display()),
            device,
        )?;
        Ok(match s.dirty_logs {
            0 => fstools::Checked::Clean,
            _ => {
                s.dirty_logs -= 1;
                fstools::Checked::LogDirty
            }
        })
    }
    fn grow_online(&self, fs: FsType, device: &Path, mountpoint: &Path) -> Result<(), SysError> {
        self.state
            .enter(
                "grow-online",
                format!(
                    "grow-online {} {} {}",
                    fs.as_str(),
                    device.display(),
                    mountpoint.display()
                ),
                device,
            )
            .map(|_| ())
    }
}
