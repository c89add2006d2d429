//! What the proxy asks of its allocator beyond allocating.

/// Hand memory that is free again back to the system, from this thread's
/// heap. mimalloc returns freed pages only after a delay, and only the next
/// time it runs on that thread: after a burst of connections is parked
/// (their tasks freed), a process that then sits idle would keep that
/// memory resident. With the system allocator this does nothing (glibc
/// trims the top of its heap by itself).
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers; any thread may call it at any
    // time.
    #[cfg(feature = "mimalloc")]
    unsafe {
        libmimalloc_sys::mi_collect(false)
    }
}
