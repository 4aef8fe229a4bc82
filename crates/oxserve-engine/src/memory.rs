//! Giving freed memory back to the system after a load and after a model version is unloaded.
//!
//! The allocator is the binary's choice, so the engine only calls a hook the binary installs.
//! mimalloc returns freed pages lazily, on a later allocation once its purge delay has passed;
//! a server that unloads a model and then goes quiet would keep the model's pages resident
//! until traffic resumes, and repeated load/unload cycles would ratchet its RSS up
//! (BENCHMARKS.md, "Model lifecycle").

use std::sync::OnceLock;

static RELEASE_HOOK: OnceLock<fn()> = OnceLock::new();

/// Installs the function that makes the allocator give freed memory back; the first call wins.
pub fn set_memory_release_hook(hook: fn()) {
    let _ = RELEASE_HOOK.set(hook);
}

/// Runs the installed hook, if any (on the thread that has just freed a version's engine).
pub(crate) fn release_freed_memory() {
    if let Some(hook) = RELEASE_HOOK.get() {
        hook();
    }
}
