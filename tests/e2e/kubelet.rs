//! The harness as kubelet: stage and publish at kubelet's own paths inside a node's kubelet mount
//! namespace, creating the parent directories there first, as kubelet does.

use cellar::csi::v1::node_client::NodeClient;
use cellar::csi::v1::*;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Status;

use cellar::csi::v1::volume_capability::access_mode::Mode;

use crate::common::{block_cap, rwo};
use crate::env::{run, Env, DRIVER, KUBELET};

/// `<kubelet>/plugins/kubernetes.io/csi/<driver>/<sha256(volume handle)>/globalmount`
pub fn staging_path(volume_id: &str) -> String {
    let hash = hex::encode(Sha256::digest(volume_id.as_bytes()));
    format!("{KUBELET}/plugins/kubernetes.io/csi/{DRIVER}/{hash}/globalmount")
}

/// Where kubelet keeps raw block volumes.
const BLOCK: &str = "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices";

/// `<kubelet>/pods/<pod uid>/volumes/kubernetes.io~csi/<pv name>/mount`
pub fn target_path(pod_uid: &str, pv: &str) -> String {
    format!("{KUBELET}/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv}/mount")
}

/// A pod that uses one volume: its UID, the PV's name, and whether it is a raw block volume.
pub struct Pod {
    pub uid: String,
    pub pv: String,
    pub block: bool,
}

impl Pod {
    pub fn new(pv: &str) -> Pod {
        Pod {
            uid: uuid::Uuid::new_v4().to_string(),
            pv: pv.to_string(),
            block: false,
        }
    }

    /// A pod with a `volumeDevices` entry: kubelet's block paths, the device published as a file.
    pub fn block(pv: &str) -> Pod {
        Pod {
            block: true,
            ..Pod::new(pv)
        }
    }

    pub fn target(&self) -> String {
        match self.block {
            false => target_path(&self.uid, &self.pv),
            true => format!("{BLOCK}/publish/{}/{}", self.pv, self.uid),
        }
    }

    pub fn staging(&self, volume_id: &str) -> String {
        match self.block {
            false => staging_path(volume_id),
            true => format!("{BLOCK}/staging/{}", self.pv),
        }
    }

    fn capability(&self) -> VolumeCapability {
        match self.block {
            false => rwo(),
            true => block_cap(Mode::SingleNodeWriter),
        }
    }

    /// The pod, running on node `node`, writes `text` to `file` in its volume (a block pod: at
    /// offset 1 MiB of the device, `file` unused) and reads it back.
    pub fn write(&self, env: &Env, node: usize, file: &str, text: &str) {
        let (script, path) = match self.block {
            false => (
                r#"printf %s "$1" > "$2"; sync; cat "$2""#,
                format!("{}/{file}", self.target()),
            ),
            true => (
                r#"printf %s "$1" | dd of="$2" bs=1M seek=1 conv=notrunc,fsync status=none; dd if="$2" bs=1M skip=1 count=1 status=none | head -c ${#1}"#,
                self.target(),
            ),
        };
        let back = env.workload(node, script, &[text, &path]);
        assert_eq!(back, text, "the pod reads back what it wrote");
    }

    /// What the pod (or another one of its node) reads from `file` in the volume.
    pub fn read(&self, env: &Env, node: usize, file: &str) -> String {
        assert!(!self.block, "read a block pod's data with write");
        env.workload(node, r#"cat "$1""#, &[&format!("{}/{file}", self.target())])
    }
}

/// kubelet on node `node` of `env`.
pub struct Kubelet<'a> {
    env: &'a Env,
    pub node: usize,
    client: NodeClient<Channel>,
}

impl<'a> Kubelet<'a> {
    pub async fn on(env: &'a Env, node: usize) -> Kubelet<'a> {
        Kubelet {
            env,
            node,
            client: env.node(node).await,
        }
    }

    fn mkdir(&self, dir: &str) {
        run(&mut self.env.in_kubelet(self.node, &["mkdir", "-p", dir]));
    }

    /// NodeStageVolume into kubelet's global mount (or block staging directory), which kubelet
    /// creates first.
    pub async fn stage(&mut self, volume_id: &str, pod: &Pod) -> Result<(), Status> {
        let staging = pod.staging(volume_id);
        self.mkdir(&staging);
        self.client
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: staging,
                volume_capability: Some(pod.capability()),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    /// NodePublishVolume into the pod's volume directory; kubelet makes its parent, the plugin the
    /// target itself.
    pub async fn publish(&mut self, volume_id: &str, pod: &Pod) -> Result<(), Status> {
        let target = pod.target();
        self.mkdir(target.rsplit_once('/').expect("parent").0);
        self.client
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: pod.staging(volume_id),
                target_path: target,
                volume_capability: Some(pod.capability()),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    /// Stage then publish, as kubelet starts a pod.
    pub async fn start_pod(&mut self, volume_id: &str, pod: &Pod) -> Result<(), Status> {
        self.stage(volume_id, pod).await?;
        self.publish(volume_id, pod).await
    }

    pub async fn unpublish(&mut self, volume_id: &str, pod: &Pod) -> Result<(), Status> {
        self.client
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: pod.target(),
            })
            .await
            .map(|_| ())
    }

    pub async fn unstage(&mut self, volume_id: &str, pod: &Pod) -> Result<(), Status> {
        self.client
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: pod.staging(volume_id),
            })
            .await
            .map(|_| ())
    }

    /// Unpublish then unstage, as kubelet tears a pod down; both must succeed.
    pub async fn stop_pod(&mut self, volume_id: &str, pod: &Pod) {
        self.unpublish(volume_id, pod).await.expect("NodeUnpublishVolume");
        self.unstage(volume_id, pod).await.expect("NodeUnstageVolume");
    }
}
