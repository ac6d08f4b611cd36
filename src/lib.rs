//! cellar: a Kubernetes CSI driver for node-local disks and shared filesystems.
//!
//! `unsafe` is forbidden in every module but `sys`, the seam where syscalls are made.

#[forbid(unsafe_code)]
pub mod agent;
#[forbid(unsafe_code)]
/// Backups into restic-format repositories that outlive their node (docs/backups.md).
pub mod backup;
#[forbid(unsafe_code)]
pub mod client;
#[forbid(unsafe_code)]
pub mod controller;
#[forbid(unsafe_code)]
pub mod crash;
#[forbid(unsafe_code)]
pub mod csi;
#[forbid(unsafe_code)]
pub mod health;
#[forbid(unsafe_code)]
pub mod identity;
#[forbid(unsafe_code)]
pub mod metrics;
#[forbid(unsafe_code)]
pub mod node;
#[forbid(unsafe_code)]
pub mod report;
#[forbid(unsafe_code)]
pub mod roles;
#[forbid(unsafe_code)]
pub mod server;
#[forbid(unsafe_code)]
pub mod storage;
/// The only module with `unsafe` (syscalls that nix and std do not wrap; each has a SAFETY comment).
pub mod sys;
