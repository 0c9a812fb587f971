//! What a per-connection process gives back before it relays, where it may sit idle for days: the stack
//! pages the login's deepest calls touched. (A process per connection pays for each page it holds; the
//! daemon's sessions share one process, and this is not for it.)

use std::fs;

/// Room left below the current frame for the calls the relay still makes, so that they do not fault pages
/// straight back in: the relay's own stack is a few KiB deep.
const RELAY_STACK: usize = 8 * 1024;

/// Hands back to the kernel the main thread's stack pages below the caller's frame (less [`RELAY_STACK`]):
/// the start call's HTTP client and the readiness probe reach deeper than the relay ever will, and the pages
/// they touched would stay resident for the session's life. Nothing lives below the stack pointer, so the
/// pages can go (they read as zeros if touched again). Only on the main thread, whose stack is the
/// `[stack]` mapping; elsewhere it does nothing.
pub fn release_unused_stack() {
    if rustix::thread::gettid() != rustix::process::getpid() {
        return;
    }
    let here = {
        let marker = 0u8;
        std::ptr::addr_of!(marker) as usize
    };
    let Some(low) = main_stack_start() else {
        return;
    };
    let page = rustix::param::page_size();
    let Some(end) = here
        .checked_sub(RELAY_STACK)
        .map(|end| end & !(page - 1))
        .filter(|&end| end > low)
    else {
        return;
    };
    // SAFETY: [low, end) lies in the main thread's stack mapping, below the current frame by RELAY_STACK:
    // no live frame or object is there, only what returned calls left. MADV_DONTNEED drops those pages; a
    // later touch maps a zeroed page, as for stack never used.
    let _ = unsafe {
        rustix::mm::madvise(
            low as *mut std::ffi::c_void,
            end - low,
            rustix::mm::Advice::LinuxDontNeed,
        )
    };
}

/// The lowest address of the `[stack]` mapping, from /proc/self/maps.
fn main_stack_start() -> Option<usize> {
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|line| line.ends_with("[stack]"))?;
    let start = line.split('-').next()?;
    usize::from_str_radix(start, 16)
        .ok()
        .filter(|&start| start != 0)
}
