//! What `status` reports: one serialisable snapshot per resource, shared by
//! the agent (which fills it) and `mdctrl` (which renders it as the
//! `clpmdstat --mirror`-style table or prints it as JSON).

use serde::{Deserialize, Serialize};

/// The role of a node for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serving the NBD export (the ancestor's "active").
    Active,
    /// Not serving; the resource is attached and ready (the ancestor's "deactive").
    Inactive,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Inactive => "inactive",
        })
    }
}

/// NBD front-end counters since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdCounters {
    /// NBD connections open now.
    pub connections_open: u64,
    /// NBD connections accepted since the agent started.
    pub connections_total: u64,
    /// Requests served (all commands).
    pub requests: u64,
    /// Bytes read by clients.
    pub read_bytes: u64,
    /// Bytes written by clients.
    pub written_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// State of the local disk as recorded in the cluster partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The local data is consistent (not a half-finished resync target).
    pub consistent: bool,
    /// A disk error was recorded for the data partition.
    pub disk_error: bool,
    /// The cluster partition failed a metadata write or sync (why); until the
    /// agent restarts on a working device no write intent can be recorded, so
    /// every client write fails and the node cannot be activated.
    #[serde(default)]
    pub metadata_error: Option<String>,
    /// Seconds for which requests to the data disk have been pending with
    /// none completing, once that reaches `timeouts.io_stall` (the disk is
    /// stalled; `engine::stall`); `None` otherwise.
    #[serde(default)]
    pub io_stalled_secs: Option<u64>,
    /// The same for the cluster partition.
    #[serde(default)]
    pub metadata_stalled_secs: Option<u64>,
    /// Requests to the data disk in progress now (all roles: client I/O,
    /// replicated writes, resync).
    #[serde(default)]
    pub io_pending: u64,
    /// Regions marked dirty in the local bitmap.
    pub dirty_regions: u64,
    /// Regions in the volume.
    pub total_regions: u64,
    /// `dirty_regions / total_regions`, in percent.
    pub difference_percent: f64,
    /// Last time the metadata recorded a change (unix seconds; informational).
    pub last_update: Option<u64>,
    /// When the mirror last broke (unix seconds; informational).
    pub break_time: Option<u64>,
    /// Current generation identifier (hex).
    pub current_generation: String,
}

impl DiskStatus {
    /// The stalled device of this snapshot, the data disk first (as
    /// `engine::Stalls::first`), with its seconds without progress.
    pub fn stall(&self) -> Option<(&'static str, u64)> {
        use crate::engine::stall::{CLUSTER_PARTITION, DATA_DISK};
        [
            (self.io_stalled_secs, DATA_DISK),
            (self.metadata_stalled_secs, CLUSTER_PARTITION),
        ]
        .into_iter()
        .find_map(|(secs, what)| secs.map(|s| (what, s)))
    }
}

/// Snapshot of one resource on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceStatus {
    /// Resource name (`md1`).
    pub resource: String,
    /// This node's name.
    pub node: String,
    /// The peer's name; `None` for a standalone resource.
    pub peer: Option<String>,
    /// This node's role.
    pub role: Role,
    /// Volume size in bytes.
    pub size: u64,
    /// Region size in bytes (granularity of the dirty bitmap).
    pub region_size: u64,
    /// Replication mode (`sync`, `semi`, `async`).
    pub mode: String,
    /// Local I/O engine in use (`io_uring (O_DIRECT)`, `portable`, ...).
    pub engine: String,
    /// Unix socket of the NBD export while active.
    pub nbd_socket: Option<String>,
    /// TCP address of the NBD export while active (if configured).
    pub nbd_tcp: Option<String>,
    /// NBD counters.
    pub nbd: NbdCounters,
    /// Local disk and metadata.
    pub disk: DiskStatus,
    /// The pair (peer connection, peer state, sync, RPO); `None` when standalone.
    #[serde(default)]
    pub pair: Option<PairStatus>,
    /// Mirror colour of this node in the ancestor's sense: GREEN (normal),
    /// YELLOW (recovering), RED (needs recovery / error), GRAY (unknown).
    pub color: String,
    /// One line telling the operator what to do next.
    pub next_step: String,
}

/// The peer's disk as it last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerDisk {
    /// Not a half-finished resync target.
    pub consistent: bool,
    /// A disk error is recorded.
    pub disk_error: bool,
    /// Its cluster partition failed (why), as it reported it.
    #[serde(default)]
    pub metadata_error: Option<String>,
    /// Its stalled device (`data disk`, `cluster partition`), as it reported
    /// it; `None` while both answer.
    #[serde(default)]
    pub stalled: Option<String>,
    /// Dirty regions in its bitmap.
    pub dirty_regions: u64,
    /// In percent of its regions.
    pub difference_percent: f64,
    /// Its last metadata update (unix seconds; informational).
    pub last_update: Option<u64>,
    /// Its last mirror break (unix seconds; informational).
    pub break_time: Option<u64>,
    /// Its current generation (hex).
    pub current_generation: String,
}

/// The pair seen from this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    /// Peer name.
    pub peer: String,
    /// `connected`, `connecting`, or `refused: why`.
    pub connection: String,
    /// The peer's socket address while connected.
    pub peer_address: Option<String>,
    /// The peer's role as it reports it; `None` while not connected.
    pub peer_role: Option<Role>,
    /// The peer's disk as it last reported it.
    pub peer_disk: Option<PeerDisk>,
    /// Age of that report in milliseconds.
    pub peer_state_age_ms: Option<u64>,
    /// Both sides hold the same data.
    pub in_sync: bool,
    /// `in sync`, or why not (which side is newer, split brain, ...).
    pub sync: String,
    /// This node is active and its writes are being replicated.
    pub replicating: bool,
    /// This node is standby and applying the active peer's writes.
    pub standby_applying: bool,
    /// Why the mirror last broke (since the agent started).
    pub last_break: Option<String>,
    /// The peer reported a failed write or flush.
    pub peer_disk_error: bool,
    /// Replication lag while active (the RPO meter).
    pub rpo: Option<crate::replica::RpoSnapshot>,
    /// The rule decision for this session (`R14 ahead-differential: ...`).
    #[serde(default)]
    pub decision: Option<String>,
    /// Why automatic recovery does not start (code: reason), if it does not.
    #[serde(default)]
    pub auto_recovery: Option<String>,
    /// The running or last resync.
    #[serde(default)]
    pub recovery: Option<RecoveryStatus>,
    /// Seconds this node has been waiting for the local writes of an ended
    /// session (its standby applier's, its resync target's) to complete;
    /// the next session and an activation wait for them. `None` when not
    /// waiting; a value that keeps growing means a stalled data disk.
    #[serde(default)]
    pub ended_session_writes_secs: Option<u64>,
}

/// Progress of a resync (the ancestor's "Recovery Status" rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// `source` or `target` (this node).
    pub role: String,
    /// `server1 -> server2`.
    pub direction: String,
    /// `differential` or `full`.
    pub kind: String,
    /// Rule that chose it.
    pub rule: String,
    /// The copy set is still being built (bitmaps exchanged and merged,
    /// divergent regions saved): `total_bytes` and `percent` are not known
    /// yet. Shown as "preparing".
    #[serde(default)]
    pub preparing: bool,
    /// Percent done.
    pub percent: f64,
    /// Bytes copied.
    pub done_bytes: u64,
    /// Bytes to copy.
    pub total_bytes: u64,
    /// Seconds since it started (until it finished, once finished).
    pub elapsed_secs: u64,
    /// The same in milliseconds (benchmarks, short resyncs).
    #[serde(default)]
    pub elapsed_ms: u64,
    /// Estimated seconds left.
    pub remaining_secs: Option<u64>,
    /// Finished successfully.
    pub finished: bool,
    /// Why it stopped.
    pub error: Option<String>,
}

/// Answer to the admin `watch` request: a status and the version of the
/// resource's state it reflects (pass it back to wait for the next change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watched {
    /// Change counter of the resource (goes up on every state change).
    pub version: u64,
    /// The status at that version (progress counters as of now).
    pub status: ResourceStatus,
}
