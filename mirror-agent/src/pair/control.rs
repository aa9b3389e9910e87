//! Per-resource control messages, carried as JSON in the peer protocol's
//! `Control` frames on the resource's data link (`docs/protocol.md`).
//!
//! Data-plane traffic (writes, acks, flushes, resync) uses the binary
//! messages; the coordination between the two agents of a resource — who is
//! active, what each side's history is — uses these, because they are rare,
//! and JSON keeps them readable in logs and easy to extend.

use serde::{Deserialize, Serialize};

/// Longest control message we send (the codec bounds what it accepts).
pub const MAX_CONTROL_LEN: usize = 16 * 1024;

/// A node's role for the resource, as the peer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    /// Serving the volume.
    Active,
    /// Not serving.
    Inactive,
}

/// Generation identifiers on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGens {
    /// Current generation.
    pub current: u64,
    /// Bitmap generation (0 = none).
    pub bitmap: u64,
    /// History, most recent first.
    pub history: [u64; 4],
}

impl From<bitmap::Generations> for WireGens {
    fn from(g: bitmap::Generations) -> Self {
        WireGens {
            current: g.current,
            bitmap: g.bitmap,
            history: g.history,
        }
    }
}

impl From<WireGens> for bitmap::Generations {
    fn from(g: WireGens) -> Self {
        bitmap::Generations {
            current: g.current,
            bitmap: g.bitmap,
            history: g.history,
        }
    }
}

/// Everything a node tells its peer about its side of a resource. Sent when
/// a session starts, on every change, and periodically (for status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// Role.
    pub role: PeerRole,
    /// Generation identifiers.
    pub gens: WireGens,
    /// Superblock flag bits (`bitmap::Flags`).
    pub flags: u32,
    /// Dirty regions in its bitmap.
    pub dirty_regions: u64,
    /// Regions in the volume.
    pub total_regions: u64,
    /// Last metadata update (unix seconds, informational).
    pub last_update: u64,
    /// Last mirror break (unix seconds, informational; 0 = never).
    pub break_time: u64,
    /// Active and replicating to the receiver (the receiver is its standby:
    /// the active decided "in sync" with fresh state and attached before
    /// sending this, and sends it before any data frame).
    #[serde(default)]
    pub replicating: bool,
    /// Its cluster partition failed (why): no write intent can be recorded
    /// there, so its writes fail until its agent restarts on a working device.
    /// Not a superblock flag: it cannot be written to the failed partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_error: Option<String>,
    /// One of its devices stalls (`"data disk"` or `"cluster partition"`):
    /// requests pending, none completing for its `timeouts.io_stall`. Sent
    /// when that starts and when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMsg {
    /// The sender's state.
    State(NodeState),
    /// The sender wants to become active; the receiver must not be active.
    ActivateRequest {
        /// Request id (echoed in the reply).
        id: u64,
    },
    /// Answer to an activation request.
    ActivateReply {
        /// The request's id.
        id: u64,
        /// Granted: the receiver is now standby for the sender.
        ok: bool,
        /// Why not, when refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Source → target: a resync starts (`crate::resync` protocol). A
    /// differential one is followed by the source's bitmap.
    ResyncBegin {
        /// Full (every region) rather than differential.
        full: bool,
        /// The target saves its copy of the regions first (forced recovery).
        save: bool,
        /// Chosen by an operator force (`decide_forced`).
        forced: bool,
        /// Rule id and name, for the target's log.
        rule: String,
    },
    /// Target → source, after its merged bitmap: ready (RESYNC_TARGET durable), or refused.
    ResyncReady {
        /// Ready.
        ok: bool,
        /// Why not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Source → target: every region is durable on the target; the source's
    /// end record is durable; adopt `source_current`.
    ResyncFinished {
        /// The source's current generation.
        source_current: u64,
    },
    /// Target → source: the target's end record is durable.
    ResyncComplete {},
    /// Ask the peer to start the resync it is the source of (`mdctrl recover`
    /// run on the target node), or the forced one with the peer as winner.
    StartResync {
        /// Request id (echoed).
        id: u64,
        /// `mdctrl force <peer>`: the receiver is the winner.
        forced: bool,
    },
    /// Answer to `StartResync`.
    StartReply {
        /// The request's id.
        id: u64,
        /// Started.
        ok: bool,
        /// Why not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl ControlMsg {
    /// Messages of the resync protocol (routed to the running resync).
    pub fn is_resync(&self) -> bool {
        matches!(
            self,
            ControlMsg::ResyncReady { .. }
                | ControlMsg::ResyncFinished { .. }
                | ControlMsg::ResyncComplete {}
        )
    }
}

impl ControlMsg {
    /// Encode as JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain types cannot fail.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"type\":\"error\",\"message\":\"{e}\"}}"))
    }

    /// Decode from JSON text, naming what was wrong.
    pub fn from_json(s: &str) -> Result<ControlMsg, String> {
        if s.len() > MAX_CONTROL_LEN {
            return Err(format!(
                "control message of {} bytes exceeds {MAX_CONTROL_LEN}",
                s.len()
            ));
        }
        serde_json::from_str(s).map_err(|e| format!("malformed control message: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = ControlMsg::State(NodeState {
            role: PeerRole::Active,
            gens: WireGens {
                current: 5,
                bitmap: 3,
                history: [1, 2, 0, 0],
            },
            flags: 3,
            dirty_regions: 10,
            total_regions: 100,
            last_update: 1,
            break_time: 0,
            replicating: false,
            metadata_error: None,
            stalled: Some("data disk".into()),
        });
        assert_eq!(ControlMsg::from_json(&m.to_json()).unwrap(), m);
        let m = ControlMsg::ActivateReply {
            id: 3,
            ok: false,
            reason: Some("active".into()),
        };
        assert_eq!(ControlMsg::from_json(&m.to_json()).unwrap(), m);
        assert!(ControlMsg::from_json(r#"{"type":"format_peer"}"#)
            .unwrap_err()
            .contains("malformed"));
    }
}
