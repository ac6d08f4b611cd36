//! Where a file's bytes live on disk: its extents as FIEMAP reports them (logical range, physical
//! address, flags), read window by window so that a fragmented file never needs all its extents in
//! memory at once. Changed block tracking compares two snapshots' extents without reading their
//! data: a reflinked copy shares the physical blocks of every range nobody wrote since.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// The extent's data lives in the last extent of the file.
pub const FLAG_LAST: u32 = 0x1;
/// Where the data is is not known (a filesystem or fallback that cannot say).
pub const FLAG_UNKNOWN: u32 = 0x2;
/// Written in memory, not yet placed on disk.
pub const FLAG_DELALLOC: u32 = 0x4;
/// Compressed or otherwise encoded: the physical address is that of the encoded data.
pub const FLAG_ENCODED: u32 = 0x8;
/// Encrypted data.
pub const FLAG_ENCRYPTED: u32 = 0x80;
/// Not block-aligned: the physical address means nothing on its own.
pub const FLAG_NOT_ALIGNED: u32 = 0x100;
/// Data stored with the metadata (btrfs inline, ext4 inline data).
pub const FLAG_INLINE: u32 = 0x200;
/// Several files' tails packed in one block.
pub const FLAG_TAIL: u32 = 0x400;
/// Allocated but never written: reads as zeros.
pub const FLAG_UNWRITTEN: u32 = 0x800;
/// Shared with another file (a reflink or a snapshot).
pub const FLAG_SHARED: u32 = 0x2000;

/// One extent of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }
}

/// The kernel's `struct fiemap` header (linux/fiemap.h).
#[repr(C)]
#[derive(Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// The kernel's `struct fiemap_extent`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// The header followed by room for `BATCH` extents, as one contiguous buffer.
#[repr(C)]
struct FiemapBuf {
    head: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

/// Extents asked for per ioctl: 512 × 56 bytes, one small buffer.
const BATCH: usize = 512;
/// Flush dirty data first, so delayed allocations have their place.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

/// The extents of `f` that overlap `[start, end)`, in logical order, as the filesystem reports
/// them (they may begin before `start` or run past `end`). A filesystem without FIEMAP is asked
/// for its data ranges instead (SEEK_DATA/SEEK_HOLE), reported with [`FLAG_UNKNOWN`] placement;
/// one that cannot tell holes either gives one unknown extent over the whole window.
pub fn extents_in(f: &OwnedFd, start: u64, end: u64) -> io::Result<Vec<Extent>> {
    extents_flagged(f, start, end, FIEMAP_FLAG_SYNC, true)
}

/// Bytes of `f`'s first `len` that share their blocks with another file (a reflink or snapshot),
/// as the filesystem reports them now (not synced: data not yet written back is not shared). A
/// filesystem without FIEMAP cannot say (an NFS share that clones): an error, not "none".
pub fn shared_bytes(f: &OwnedFd, len: u64) -> io::Result<u64> {
    Ok(extents_flagged(f, 0, len, 0, false)?
        .iter()
        .filter(|e| e.flags & FLAG_SHARED != 0)
        .map(|e| e.end().min(len).saturating_sub(e.logical))
        .sum())
}

/// [`extents_in`] with FIEMAP's `fm_flags`; `fallback`: a filesystem without FIEMAP is asked for
/// its data ranges instead (else it is an error).
fn extents_flagged(f: &OwnedFd, start: u64, end: u64, fm_flags: u32, fallback: bool) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let mut buf = FiemapBuf {
            head: FiemapHeader {
                fm_start: at,
                fm_length: end - at,
                fm_flags,
                fm_extent_count: BATCH as u32,
                ..Default::default()
            },
            extents: [FiemapExtent::default(); BATCH],
        };
        // SAFETY: buf is a live, writable `struct fiemap` followed by room for fm_extent_count
        // extents, exactly what FS_IOC_FIEMAP reads and fills; f is a valid open fd.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut buf as *mut FiemapBuf) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) if out.is_empty() && fallback => {
                    data_ranges(f, start, end)
                }
                _ => Err(e),
            };
        }
        let n = (buf.head.fm_mapped_extents as usize).min(BATCH);
        let mut last = false;
        let mut progressed = false;
        for e in &buf.extents[..n] {
            let x = Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: e.fe_flags,
            };
            last |= x.flags & FLAG_LAST != 0;
            if x.end() > at {
                at = x.end();
                progressed = true;
            }
            out.push(x);
        }
        // Fewer than asked for: nothing more in the window. No progress: a filesystem that keeps
        // answering the same extent must not loop us forever.
        if n < BATCH || last || !progressed {
            break;
        }
    }
    Ok(out)
}

/// The data ranges of `[start, end)` without placement, for filesystems without FIEMAP.
fn data_ranges(f: &OwnedFd, start: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    super::copy::data_extents_from(f, start, end, |s, e| {
        out.push(Extent {
            logical: s,
            physical: 0,
            length: e - s,
            flags: FLAG_UNKNOWN,
        });
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_structs_have_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<FiemapHeader>(), 32);
        assert_eq!(std::mem::size_of::<FiemapExtent>(), 56);
        // _IOWR('f', 11, 32 bytes): dir 3 << 30, size 32 << 16, type 'f' << 8, nr 11.
        assert_eq!(
            FS_IOC_FIEMAP,
            (3 << 30) | (32 << 16) | ((b'f' as libc::c_ulong) << 8) | 11
        );
    }

    #[test]
    fn a_sparse_file_has_its_written_ranges_and_no_more() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let file = std::fs::File::create(&p).expect("create");
        file.set_len(64 << 20).expect("size");
        file.write_all_at(&[7u8; 8192], 1 << 20).expect("write");
        file.write_all_at(&[9u8; 4096], 32 << 20).expect("write");
        file.sync_all().expect("fsync");
        let f = OwnedFd::from(file);
        let ext = extents_in(&f, 0, 64 << 20).expect("extents");
        let data: u64 = ext
            .iter()
            .filter(|e| e.flags & FLAG_UNWRITTEN == 0)
            .map(|e| e.length)
            .sum();
        // Filesystems allocate in blocks (tmpfs in pages); none maps the holes.
        assert!((12288..=4 << 20).contains(&data), "{ext:?}");
        assert!(ext.iter().any(|e| e.logical <= 1 << 20 && e.end() >= (1 << 20) + 8192));
        assert!(ext
            .iter()
            .any(|e| e.logical <= 32 << 20 && e.end() >= (32 << 20) + 4096));
        // A window past the data has none.
        assert!(extents_in(&f, 40 << 20, 64 << 20).expect("extents").is_empty());
    }
}
