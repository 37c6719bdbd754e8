#![no_std]
// The library target exists so `cargo` can resolve the crate as a build-dependency of
// proxy-userspace (for change tracking); the programs live in the `proxy` binary.
