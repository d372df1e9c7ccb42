//! Signals during blocking calls: `SA_RESTART`, as the kernel honours it.
//!
//! When a signal handler runs while a thread sleeps in a blocking socket
//! call, Linux restarts the call if the handler was installed with
//! `SA_RESTART` (and the socket has no `SO_RCVTIMEO`/`SO_SNDTIMEO`), and
//! fails it with EINTR otherwise. A vSocket call sleeps in `poll` on its
//! doorbell, which the kernel never restarts, and the library cannot ask
//! the kernel which signal interrupted it. So the library installs the
//! program's handlers itself (`hooks::sigaction`, `signal`): the kernel
//! sees a trampoline that notes the signal's number for the interrupted
//! thread and then calls the program's handler with the program's flags;
//! the program, asking `sigaction` what is installed, sees its own handler.
//! A sleeping call that returns EINTR then looks up whether that signal's
//! handler asked for `SA_RESTART`.
//!
//! Handlers installed behind the library's back (the raw `rt_sigaction`
//! system call) are not seen: calls they interrupt fail with EINTR.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// Signal numbers run from 1 to 64 on Linux.
pub const NSIG: usize = 65;

/// The program's own disposition of one signal, while the library's
/// trampoline stands in for it.
struct Disposition {
    /// The program's handler (`sa_handler` or `sa_sigaction`); 0 when the
    /// trampoline is not installed for this signal.
    handler: AtomicUsize,
    /// The program's `sa_flags`.
    flags: AtomicI32,
}

#[allow(clippy::declare_interior_mutable_const)]
const NONE: Disposition = Disposition { handler: AtomicUsize::new(0), flags: AtomicI32::new(0) };
static DISPOSITIONS: [Disposition; NSIG] = [NONE; NSIG];

/// What ran on this thread since `wait_begins`.
const QUIET: u8 = 0;
/// Handlers that asked for `SA_RESTART`, only.
const RESTART: u8 = 1;
/// At least one handler without `SA_RESTART`.
const INTERRUPT: u8 = 2;

thread_local! {
    static SEEN: Cell<u8> = const { Cell::new(QUIET) };
}

fn slot(sig: i32) -> Option<&'static Disposition> {
    usize::try_from(sig).ok().filter(|&s| s > 0).and_then(|s| DISPOSITIONS.get(s))
}

/// The program's handler and flags for `sig`, if the trampoline stands in.
pub fn program_action(sig: i32) -> Option<(usize, i32)> {
    let d = slot(sig)?;
    let handler = d.handler.load(Ordering::Acquire);
    (handler != 0).then(|| (handler, d.flags.load(Ordering::Relaxed)))
}

/// The trampoline now stands in for the program's `handler` on `sig`.
pub fn install(sig: i32, handler: usize, flags: i32) {
    if let Some(d) = slot(sig) {
        d.flags.store(flags, Ordering::Relaxed);
        d.handler.store(handler, Ordering::Release);
    }
}

/// The program set `SIG_DFL` or `SIG_IGN` on `sig`: no trampoline.
pub fn uninstall(sig: i32) {
    if let Some(d) = slot(sig) {
        d.handler.store(0, Ordering::Release);
    }
}

/// Called by the trampoline, in signal context (no allocation, no
/// locks), before it runs the program's handler of `sig` with `flags`.
pub fn delivered(sig: i32, flags: i32) {
    let seen = if flags & libc::SA_RESTART != 0 { RESTART } else { INTERRUPT };
    SEEN.set(SEEN.get().max(seen));
    if flags & libc::SA_RESETHAND != 0 {
        // The kernel has put back SIG_DFL.
        uninstall(sig);
    }
}

/// Called when a blocking call begins to wait, before it spins: from then
/// on every handler that runs on this thread counts, whether it ran while
/// the thread slept in the kernel or between two of its sleeps (spinning,
/// or looking at shared memory), where the kernel's call would have been
/// asleep all along and ended by the signal.
pub fn wait_begins() {
    SEEN.set(QUIET);
}

/// Has any handler run since the wait began? poll, select and epoll_wait
/// then fail with EINTR, whatever the handler's flags.
pub fn handler_ran() -> bool {
    SEEN.get() != QUIET
}

/// Has a handler run since the wait began that ends a blocking socket
/// call with EINTR (see [`restart_after_interrupt`])?
pub fn interrupts(timeout: SocketTimeout) -> bool {
    handler_ran() && !restart_after_interrupt(timeout)
}

/// After a sleep ended with EINTR: would the kernel have restarted the
/// call? Only if every handler that ran asked for it, and the socket has no
/// timeout for this direction, which makes the kernel fail with EINTR
/// whatever the flags.
pub fn restart_after_interrupt(timeout: SocketTimeout) -> bool {
    timeout == SocketTimeout::None && SEEN.get() == RESTART
}

/// Whether the interrupted call had a socket timeout (SO_RCVTIMEO,
/// SO_SNDTIMEO) for its direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketTimeout {
    None,
    Set,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_s_action_is_kept_and_forgotten() {
        install(libc::SIGUSR1, 0x1234, libc::SA_RESTART);
        assert_eq!(program_action(libc::SIGUSR1), Some((0x1234, libc::SA_RESTART)));
        uninstall(libc::SIGUSR1);
        assert_eq!(program_action(libc::SIGUSR1), None);
        assert_eq!(program_action(0), None);
        assert_eq!(program_action(-3), None);
        assert_eq!(program_action(200), None);
    }

    #[test]
    fn restart_follows_the_interrupting_handlers_flags() {
        wait_begins();
        assert!(!restart_after_interrupt(SocketTimeout::None), "no handler ran: EINTR");
        delivered(libc::SIGUSR2, libc::SA_RESTART);
        assert!(restart_after_interrupt(SocketTimeout::None));
        assert!(!restart_after_interrupt(SocketTimeout::Set), "a socket timeout means EINTR");
        delivered(libc::SIGALRM, 0);
        assert!(!restart_after_interrupt(SocketTimeout::None), "one handler without SA_RESTART: EINTR");
        wait_begins();
        delivered(libc::SIGALRM, 0);
        delivered(libc::SIGUSR2, libc::SA_RESTART);
        assert!(!restart_after_interrupt(SocketTimeout::None));
    }

    #[test]
    fn a_handler_that_ran_between_sleeps_ends_the_wait() {
        wait_begins();
        assert!(!handler_ran() && !interrupts(SocketTimeout::None));
        delivered(libc::SIGUSR2, libc::SA_RESTART);
        assert!(handler_ran(), "poll, select and epoll_wait end");
        assert!(!interrupts(SocketTimeout::None), "a socket call goes on under SA_RESTART");
        assert!(interrupts(SocketTimeout::Set), "unless the socket has a timeout");
        delivered(libc::SIGALRM, 0);
        assert!(interrupts(SocketTimeout::None));
        wait_begins();
        assert!(!handler_ran(), "a new wait forgets what ran before it");
    }

    #[test]
    fn a_one_shot_handler_is_forgotten_once_delivered() {
        install(libc::SIGWINCH, 0x99, libc::SA_RESETHAND | libc::SA_RESTART);
        delivered(libc::SIGWINCH, libc::SA_RESETHAND | libc::SA_RESTART);
        assert_eq!(program_action(libc::SIGWINCH), None);
    }
}
