//! The agent's heap as the node sees it (its RSS).

/// Gives memory the heap holds freed back to the system. glibc keeps freed memory for later
/// allocations, each thread's arena its own: after a large sync (the plans, the objects and
/// compiled state it replaced) or a large parse (on threads of its own, whose arenas the sync
/// does not reuse), RSS would stay at the high-water mark. A walk of the free lists: for rare,
/// large events only.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
