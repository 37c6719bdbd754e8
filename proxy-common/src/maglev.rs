//! Maglev lookup tables: for a frontend with the Maglev scheduler, entry `hash % M` of its table
//! names the backend of a flow. The table (M entries, M prime and the same on every node) is
//! cut into chunks of `MAGLEV_CHUNK` backend ids, one map entry each, so a table costs 4 bytes
//! per entry whatever M is. Chunks follow the frontend's slot generation (`ServiceValue::rev`),
//! so a table is replaced without ever being seen half-written.

use crate::pod;

/// Backend ids per chunk.
pub const MAGLEV_CHUNK: usize = 256;

/// Key of `LB_MAGLEV`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaglevKey {
    /// `ServiceValue::id`.
    pub svc_id: u32,
    /// 0 or 1, as in `SlotKey`.
    pub generation: u16,
    /// Table entries `chunk * MAGLEV_CHUNK ..`.
    pub chunk: u16,
}

/// Value of `LB_MAGLEV`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    /// Backend ids (keys of `LB_BACKENDS`); past the table's end, 0.
    pub backend_ids: [u32; MAGLEV_CHUNK],
}

pod!(MaglevKey, MaglevChunk);
