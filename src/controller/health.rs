//! ControllerGetVolumeHealth and ControllerListVolumeHealth (CSI v1.13): the conditions that
//! ControllerGetVolume and ListVolumes report, read as health entries (docs/health.md).

use crate::controller::error::ControllerError;

use super::{page, ControllerService};
use crate::csi::health::{controller_finding, Finding};
use crate::csi::v1::{
    ControllerGetVolumeHealthRequest, ControllerGetVolumeHealthResponse, ControllerGetVolumeRequest,
    ControllerListVolumeHealthRequest, ControllerListVolumeHealthResponse,
};
use crate::storage::engine::Condition;

impl ControllerService {
    /// Names the CSI 1.13 health capabilities in ControllerGetCapabilities (the RPCs are served
    /// either way).
    pub fn advertising_health(mut self, advertise: bool) -> Self {
        self.advertise_health = advertise;
        self
    }

    /// The health of one volume, from the very answer ControllerGetVolume gives.
    pub(super) async fn volume_health(
        &self,
        r: ControllerGetVolumeHealthRequest,
    ) -> Result<ControllerGetVolumeHealthResponse, ControllerError> {
        let got = self
            .get_volume(&ControllerGetVolumeRequest {
                volume_id: r.volume_id.clone(),
            })
            .await?;
        let finding = match got.status.and_then(|s| s.volume_condition) {
            Some(c) => controller_finding(&Condition {
                abnormal: c.abnormal,
                message: c.message,
            }),
            None => Finding::healthy(""),
        };
        Ok(ControllerGetVolumeHealthResponse {
            volume_health: Some(finding.volume_health(&r.volume_id)),
        })
    }

    /// Every volume, healthy ones too (with no entries), paged like ListVolumes from the same
    /// listing: an absent volume then means deleted, never "recovered, or on another page".
    pub(super) async fn list_volume_health(
        &self,
        r: ControllerListVolumeHealthRequest,
    ) -> Result<ControllerListVolumeHealthResponse, ControllerError> {
        let all = self.listing(!r.starting_token.is_empty()).await?;
        let (items, next_token) =
            page::page_sorted(&all, |l| l.volume().id().to_string(), &r.starting_token, r.max_entries)?;
        let entries = items
            .iter()
            .map(|l| controller_finding(l.condition()).volume_health(l.volume().id()))
            .collect();
        Ok(ControllerListVolumeHealthResponse { entries, next_token })
    }
}
