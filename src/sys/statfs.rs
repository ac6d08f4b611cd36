//! Filesystem usage figures from statvfs(2).

use std::path::Path;

use super::{Step, SysError};

/// What statvfs says of the filesystem holding a path, in bytes and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub fn usage(path: &Path) -> Result<FsUsage, SysError> {
    let st = nix::sys::statvfs::statvfs(path).step("statvfs", path)?;
    let frag = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frag;
    let free = st.blocks_free() as u64 * frag;
    let avail = st.blocks_available() as u64 * frag;
    let files = st.files() as u64;
    let ffree = st.files_free() as u64;
    Ok(FsUsage {
        total_bytes: total,
        available_bytes: avail,
        used_bytes: total.saturating_sub(free),
        total_inodes: files,
        free_inodes: ffree,
        used_inodes: files.saturating_sub(ffree),
    })
}
