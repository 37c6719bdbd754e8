//! Layer 3: Services. Frontend lookup, backend selection (schedulers, session affinity),
//! source ranges, rejects; the socket-layer translation (`sock`) and new flows at tc
//! (`nodeport`) and XDP (`xdp`), which hand the chosen backend to the flow engine. Imports
//! only the layers below.

pub mod frontend;
pub mod lb;
pub mod newflow;
pub mod nodeport;
pub mod reject;
pub mod sock;
pub mod xdp;
