//! cellar: a Kubernetes CSI driver for node-local disks and shared filesystems.

pub mod agent;
pub mod client;
pub mod controller;
pub mod crash;
pub mod csi;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod report;
pub mod roles;
pub mod server;
pub mod storage;
pub mod sys;
