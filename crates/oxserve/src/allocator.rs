//! The process's allocator: mimalloc, told to commit its arenas as they are used instead of
//! all at once (`arena_eager_commit = 0`; mimalloc's default on Linux is eager). Memory in an
//! eagerly committed arena stays resident after it is freed; committed on demand, freed pages
//! are given back to the system after mimalloc's purge delay, so what an unloaded model or a
//! finished burst of requests used does not stay in the server's RSS (BENCHMARKS.md, "Model
//! lifecycle"). An operator's own `MIMALLOC_ARENA_EAGER_COMMIT` wins.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option index for `arena_eager_commit` (its `mi_option_e`; the Rust bindings do
/// not name it).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets the option before the Rust runtime's first allocation makes mimalloc's first arena
/// (whose commit mode is fixed then): a constructor, run before `main`.
// SAFETY (the constructor): it runs after mimalloc's own (priority 101) set-up, touches no Rust
// runtime state before the option is set, and only reads the environment, which nothing
// writes this early.
#[ctor::ctor(unsafe)]
fn configure() {
    set(0);
    // Reading the environment allocates, so only after the option is in place.
    if let Some(value) = std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT") {
        set(match value.to_str().map(str::trim) {
            Some("1" | "on" | "true" | "yes") => 1,
            Some(v) => v.parse().unwrap_or(0),
            None => 0,
        });
    }
}

fn set(value: std::ffi::c_long) {
    // SAFETY: `mi_option_set` only stores an integer in mimalloc's option table; it takes no
    // pointers and does not allocate.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, value);
    }
}

/// Makes the allocators give back now the pages freed so far: mimalloc's (its arenas' and
/// abandoned segments' included) instead of on a later allocation after its purge delay, and
/// glibc's arenas. The engine calls it when a load has finished and once a model version has
/// been unloaded (`oxserve_engine::set_memory_release_hook`): a large amount was just freed and
/// the server may stay quiet for a while. Not on the request path.
pub fn release_freed_memory() {
    RELEASES.fetch_add(1, Ordering::Relaxed);
    collect_this_thread();
    // ONNX Runtime, TensorFlow and libtorch allocate through glibc's malloc, whose per-thread
    // arenas keep freed memory until trimmed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointers and is thread-safe (it locks each arena in turn).
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How many releases there have been: the async workers compare it with the count they last
/// saw (`SEEN_RELEASES`).
static RELEASES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN_RELEASES: Cell<u64> = const { Cell::new(0) };
}

/// The async runtime's park hook: an async worker collects its own heap once after each
/// release. mimalloc's pages belong to the thread that allocated them, and the request
/// handling on these threads (model metadata, answers, the load and unload calls themselves)
/// leaves pages that only their owner purges, so a release on the unloading thread alone left
/// most of the growth over reload cycles (BENCHMARKS.md, "Model lifecycle"). Between releases
/// this is a relaxed load and a thread-local compare per park.
pub fn collect_after_release() {
    let releases = RELEASES.load(Ordering::Relaxed);
    if SEEN_RELEASES.with(|seen| seen.replace(releases)) != releases {
        collect_this_thread();
    }
}

fn collect_this_thread() {
    // SAFETY: `mi_collect` takes no pointers; with `force` it collects the calling thread's
    // heap, the abandoned segments and purges the arenas, all under mimalloc's own locks.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
