//! Layer 4: what each attached program does first, before the layers below take over. The
//! programs themselves (`main.rs`) are one call each into here or into `services`/`flow`.
//! Imports only the layers below.

pub mod tc;
pub mod xdp;
