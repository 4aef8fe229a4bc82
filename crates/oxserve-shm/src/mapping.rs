//! Read-only mappings of clients' shared-memory objects, so floating-point inputs reach the
//! engine without a copy (as in Triton; other types are copied, see `may_stay_a_view`), made
//! safe against the one thing a mapping cannot survive on its own: the client shrinking its
//! object while the server reads it. Touching a mapped page past the new end of the object
//! raises SIGBUS, which would kill the server.
//!
//! A process-wide SIGBUS handler (installed with the first mapping) looks the faulting address
//! up in a fixed table of live mappings. If it is in one, it maps anonymous zero pages over the
//! whole mapping (`MAP_FIXED`), marks it poisoned and returns: the faulting read, and every
//! later one, sees zeros instead of faulting. The front-ends fail every request whose inputs
//! came from a poisoned mapping, and the region refuses further use until it is registered
//! again. Any other SIGBUS goes to the handler that was there before (Rust's, or the default
//! action), so real faults still terminate the process. Wayland compositors protect their
//! clients' shared-memory pools the same way.
//!
//! The table is read by the handler, which may interrupt any thread at any point, so it is
//! atomics only: each slot is a small seqlock over (start, length) plus a poisoned flag, and a
//! slot is cleared before its mapping is unmapped.
#![allow(unsafe_code)]

use std::fs::File;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};

use memmap2::{Mmap, MmapOptions};

/// Live mappings at most: regions (at most [`super::MAX_REGIONS`]) plus unregistered ones that
/// requests in flight still hold. Past this a region falls back to positioned reads.
const SLOTS: usize = 1024;

/// A read-only shared mapping of `len` bytes of a file, registered with the SIGBUS handler.
#[derive(Debug)]
pub(super) struct Mapping {
    slot: usize,
    map: Mmap,
}

impl Mapping {
    /// Maps `len` bytes at `offset` of `file`; `None` when the table of mappings is full or the
    /// kernel refuses the mapping (the caller copies instead).
    pub(super) fn new(file: &File, offset: u64, len: usize) -> Option<Mapping> {
        if !install_handler() {
            return None;
        }
        let slot = claim_slot()?;
        // SAFETY: the mapping is read-only and only read through `bytes`. The client may change
        // the bytes at any time (its own inputs, as with any shared memory) or shrink the
        // object; the range is published to the SIGBUS handler below, before the mapping is
        // handed out, so a read past the new end finds zero pages instead of killing us.
        let map = match unsafe { MmapOptions::new().offset(offset).len(len).map(file) } {
            Ok(map) => map,
            Err(_) => {
                release_slot(slot);
                return None;
            }
        };
        // memmap2 maps from the page holding `offset`; the handler needs the whole span.
        let lead = (offset % page_size() as u64) as usize;
        let start = map.as_ptr() as usize - lead;
        publish(slot, start, (len + lead).next_multiple_of(page_size()));
        Some(Mapping { slot, map })
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Whether the client shrank the object under a read and the mapping became zero pages.
    pub(super) fn poisoned(&self) -> bool {
        TABLE[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Runs before `map` is unmapped: the handler never sees a range that is gone.
        release_slot(self.slot);
    }
}

struct Slot {
    claimed: AtomicBool,
    /// Even when (start, len) is consistent; odd while the owner rewrites it.
    seq: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // the initialiser of each slot, not shared
const EMPTY: Slot = Slot {
    claimed: AtomicBool::new(false),
    seq: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

fn claim_slot() -> Option<usize> {
    TABLE.iter().position(|slot| {
        slot.claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

/// Sets a claimed slot's range (zero length: no range). Only the slot's owner writes it.
fn publish(slot: usize, start: usize, len: usize) {
    let slot = &TABLE[slot];
    slot.seq.fetch_add(1, Ordering::Relaxed);
    fence(Ordering::Release);
    slot.start.store(start, Ordering::Relaxed);
    slot.len.store(len, Ordering::Relaxed);
    slot.poisoned.store(false, Ordering::Relaxed);
    slot.seq.fetch_add(1, Ordering::Release);
}

fn release_slot(slot: usize) {
    publish(slot, 0, 0);
    TABLE[slot].claimed.store(false, Ordering::Release);
}

/// The slot holding `addr`, with its (start, len) read consistently; async-signal-safe.
fn find(addr: usize) -> Option<(&'static Slot, usize, usize)> {
    TABLE.iter().find_map(|slot| {
        // A slot being rewritten right now is not the faulting mapping: that one is in use
        // by the faulting thread, so its owner cannot be releasing it. A few tries suffice.
        for _ in 0..4 {
            let before = slot.seq.load(Ordering::Acquire);
            let (start, len) = (
                slot.start.load(Ordering::Relaxed),
                slot.len.load(Ordering::Relaxed),
            );
            fence(Ordering::Acquire);
            if before % 2 == 0 && slot.seq.load(Ordering::Relaxed) == before {
                return (len > 0 && addr >= start && addr - start < len).then_some((slot, start, len));
            }
        }
        None
    })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// The SIGBUS disposition found when ours was installed, called for faults that are not ours.
static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_SIGINFO: AtomicBool = AtomicBool::new(false);

/// Installs the SIGBUS handler once; whether it is in place (without it nothing is mapped).
fn install_handler() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: plain sigaction calls with a zeroed struct filled in as the man page says;
        // the handler only uses async-signal-safe operations (atomics, mmap, sigaction, raise).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            let installed = libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0;
            if installed {
                PREVIOUS_HANDLER.store(previous.sa_sigaction, Ordering::Release);
                PREVIOUS_SIGINFO.store(previous.sa_flags & libc::SA_SIGINFO != 0, Ordering::Release);
            }
            installed
        }
    })
}

extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let fault = unsafe { info.as_ref() }
        .filter(|info| info.si_code == libc::BUS_ADRERR)
        // SAFETY: si_addr is the faulting address for BUS_ADRERR.
        .map(|info| unsafe { info.si_addr() } as usize);
    if let Some((slot, start, len)) = fault.and_then(find) {
        // SAFETY: [start, start + len) is a live mapping of ours (its owner unpublishes it
        // before unmapping, and the faulting thread is reading it); replacing it with
        // anonymous read-only pages of the same size leaves every pointer into it valid.
        let zeroed = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if zeroed != libc::MAP_FAILED {
            slot.poisoned.store(true, Ordering::Release);
            return;
        }
    }
    chain(signal, info, context);
}

/// Hands a SIGBUS that is not ours to the previous handler, or restores the default action
/// and raises the signal again (it is blocked until this handler returns, then terminates).
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS_HANDLER.load(Ordering::Acquire);
    // SAFETY: `previous` is the handler the process had installed, called as its flags say;
    // the default-action path uses only async-signal-safe calls.
    unsafe {
        if previous != libc::SIG_DFL && previous != libc::SIG_IGN {
            if PREVIOUS_SIGINFO.load(Ordering::Acquire) {
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(previous);
                handler(signal, info, context);
            } else {
                let handler: extern "C" fn(libc::c_int) = std::mem::transmute(previous);
                handler(signal);
            }
            return;
        }
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(signal, &default, std::ptr::null_mut());
        libc::raise(signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize, byte: u8) -> (tempfile::NamedTempFile, File) {
        let mut tmp = tempfile::NamedTempFile::new().expect("temp file");
        tmp.write_all(&vec![byte; len]).expect("write");
        let file = tmp.reopen().expect("reopen");
        (tmp, file)
    }

    #[test]
    fn a_mapping_shrunk_under_a_read_turns_into_zeros_and_is_poisoned() {
        let page = page_size();
        let (tmp, file) = file_of(8 * page, 7);
        // An offset that is not page-aligned, so the span starts before the bytes.
        let map = Mapping::new(&file, 100, 5 * page).expect("mapped");
        assert_eq!(map.bytes()[0], 7);
        assert!(!map.poisoned());
        tmp.as_file().set_len(page as u64).expect("shrink");
        // Every byte past the new end would raise SIGBUS; the handler zeroes the mapping.
        let seen: Vec<u8> = std::thread::scope(|s| s.spawn(|| map.bytes().to_vec()).join().expect("reader"));
        assert_eq!(seen.len(), 5 * page);
        // The mapping starts 100 bytes into the object, which now ends after one page.
        assert!(seen[page - 100..].iter().all(|&b| b == 0), "past the end: zeros");
        assert!(map.poisoned());
        assert!(
            map.bytes().iter().all(|&b| b == 0),
            "then the whole mapping reads as zeros"
        );
        // The slot is reused clean once the mapping is gone.
        drop(map);
        let (_tmp2, file2) = file_of(page, 9);
        let again = Mapping::new(&file2, 0, page).expect("mapped");
        assert!(!again.poisoned());
        assert_eq!(again.bytes()[page - 1], 9);
    }

    /// A SIGBUS outside our mappings must still terminate the process: run in a child.
    #[test]
    fn a_fault_outside_our_mappings_still_terminates() {
        const CHILD: &str = "OXSERVE_SIGBUS_CHILD";
        let page = page_size();
        if std::env::var_os(CHILD).is_some() {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain setrlimit; the child is about to die of SIGBUS and must not dump core.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            let (_tmp, file) = file_of(page, 1);
            let _ours = Mapping::new(&file, 0, page).expect("handler installed");
            let (foreign_tmp, foreign) = file_of(4 * page, 1);
            // SAFETY: deliberately faulting in a child process; nothing else uses the mapping.
            let map = unsafe { MmapOptions::new().len(4 * page).map(&foreign) }.expect("map");
            foreign_tmp.as_file().set_len(0).expect("shrink");
            // Reaching the exit means the fault was swallowed: the parent sees status 0.
            std::hint::black_box(map.iter().map(|&b| u64::from(b)).sum::<u64>());
            std::process::exit(0);
        }
        let exe = std::env::current_exe().expect("test binary");
        let status = std::process::Command::new(exe)
            .args([
                "--exact",
                "mapping::tests::a_fault_outside_our_mappings_still_terminates",
            ])
            .env(CHILD, "1")
            .output()
            .expect("run child");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.status.signal(),
            Some(libc::SIGBUS),
            "{:?}\n{}",
            status.status,
            String::from_utf8_lossy(&status.stderr)
        );
    }
}
