//! glibc malloc settings for fedmesh's proxies.
//!
//! A proxy allocates and frees buffers of tens to hundreds of kilobytes
//! per burst (TLS records, HTTP/2 frames, splice buffers, QUIC packets).
//! glibc's defaults hand the top of a heap back to the kernel once more
//! than 128 kB of it is free (`madvise`/`brk`) and serve allocations from
//! 128 kB up (adjusted at run time) with fresh `mmap`s, so the next burst
//! faults every page in again: page faults were 7–16 % of a sidecar's and
//! a gateway's CPU on the cross-cluster QUIC path (docs/performance.md,
//! "Issue 36"). The price: after a burst a process keeps about what it
//! peaked at (up to [`TRIM_THRESHOLD`] free per heap) instead of handing
//! it back; RSS before any load is unchanged.

/// Free memory at the top of a heap kept for the next burst.
pub const TRIM_THRESHOLD: i32 = 32 << 20;
/// Allocations from this size up get their own mapping: larger than any
/// per-connection buffer of the data path, so those come from the heap.
pub const MMAP_THRESHOLD: i32 = 4 << 20;
/// Extra memory asked for each time a heap grows.
pub const TOP_PAD: i32 = 1 << 20;

/// What [`tune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuned {
    /// The settings above are in force.
    Applied,
    /// `GLIBC_TUNABLES` sets malloc parameters: the operator's choice wins.
    LeftToTunables,
    /// Not glibc (musl, other systems): nothing to do.
    Unsupported,
}

/// Applies the settings, unless `GLIBC_TUNABLES` already sets malloc
/// parameters. Call first thing in `main`, before any thread starts.
pub fn tune() -> Tuned {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if tunables.contains("glibc.malloc.") {
        return Tuned::LeftToTunables;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Tuned {
    for (param, value) in [
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TOP_PAD, TOP_PAD),
    ] {
        // SAFETY: `mallopt` takes two integers and no pointers; it only
        // changes parameters glibc's allocator reads under its own locks.
        // glibc marks it MT-Unsafe only against a concurrent first use of
        // malloc ("init"); `tune` is documented to run before any thread
        // starts, and Rust's runtime has initialised malloc by then.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(param, value) };
        if ok != 1 {
            return Tuned::Unsupported;
        }
    }
    Tuned::Applied
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Tuned {
    Tuned::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mapped chunks glibc holds now (its own count).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn mapped_chunks() -> usize {
        // SAFETY: `mallinfo2` takes nothing and returns a plain struct of
        // counters, read under glibc's own arena locks.
        #[allow(unsafe_code)]
        let info = unsafe { libc::mallinfo2() };
        info.hblks
    }

    /// After `tune`, a 2 MiB buffer (a burst's worth of TLS records or
    /// packets) comes from the heap, where its pages stay for the next
    /// burst, instead of a mapping of its own that is unmapped on free
    /// (glibc's default threshold is 128 kB).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_burst_buffer_comes_from_the_heap() {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            assert_eq!(tune(), Tuned::LeftToTunables);
            return;
        }
        // The test harness runs threads already; mallopt is safe to call
        // here, only its "before any thread" advice (the first malloc's
        // setup) does not hold, and malloc was set up long ago.
        assert_eq!(tune(), Tuned::Applied);
        let before = mapped_chunks();
        let buf = std::hint::black_box(vec![1u8; 2 << 20]);
        assert_eq!(
            mapped_chunks(),
            before,
            "the buffer got a mapping of its own"
        );
        drop(buf);
    }
}
