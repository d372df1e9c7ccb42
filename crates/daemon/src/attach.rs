//! Guest attachments: one control socket per guest.
//!
//! A guest's identity comes from the attachment, never from what its
//! processes say: every process that connects to guest G's socket must
//! live in G's network namespace (the pid from SO_PEERCRED, then the
//! namespace of /proc/PID/ns/net), or it is refused and the refusal logged
//! and counted. Each accepted channel gets a thread; a malformed message
//! closes that channel only.
//!
//! Guests come and go with live policy changes (`crate::live`): a new
//! guest's socket is made by [`open_control`] and served by [`serve_guest`];
//! a removed guest's slot shuts its socket and channels down
//! ([`GuestSlot::remove`]), which ends their threads.
//!
//! A guest may have `max_channels` channels (threads) at once (the limit
//! of the policy in force when a channel is accepted; what is held is
//! counted in the guest's slot). Past that the daemon closes a new channel
//! at once, counted and logged: the library treats a closed channel as an
//! unreachable daemon, so that process's connects take the kernel path and
//! that socket listens on the kernel only, as it would without vSocket.
//! Other guests are not touched.

use crate::broker;
use crate::quota::Quota;
use crate::state::{Daemon, GuestSlot};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vsocket_abi::control::{Message, MAX_MESSAGE};

/// Creates every guest's control socket and serves each on its own thread.
pub fn serve_guests(daemon: &Arc<Daemon>) -> io::Result<()> {
    let policy = daemon.policy();
    let run_dir = &policy.config.host().run_dir;
    // Guests placed on other hosts attach to their own hosts' daemons.
    for slot in policy.slots().iter().filter(|slot| slot.local) {
        let listener = open_control(run_dir, slot)?;
        serve_guest(daemon, slot, listener)?;
    }
    Ok(())
}

/// Creates guest `slot`'s control socket under `run_dir`.
pub fn open_control(run_dir: &Path, slot: &GuestSlot) -> io::Result<OwnedFd> {
    std::fs::create_dir_all(run_dir.join("guests"))?;
    let path = crate::guest_socket_path(run_dir, &slot.name);
    let listener = vsocket_sys::seqpacket_listen(&path, 1024)
        .map_err(|e| io::Error::new(e.kind(), format!("control socket {}: {e}", path.display())))?;
    // Processes inside guests may run as any user; the namespace check
    // is what keeps one guest out of another's socket.
    vsocket_sys::chmod(&path, 0o666)?;
    Ok(listener)
}

/// Serves guest `slot`'s control socket `listener` on its own thread, until
/// the guest is removed.
pub fn serve_guest(daemon: &Arc<Daemon>, slot: &Arc<GuestSlot>, listener: OwnedFd) -> io::Result<()> {
    if !slot.hold(GuestSlot::CONTROL, &listener) {
        return Ok(());
    }
    let (daemon, slot) = (daemon.clone(), slot.clone());
    std::thread::Builder::new().name(format!("attach-{}", slot.name)).spawn(move || {
        accept_loop(&daemon, &slot, listener);
        tracing::info!(guest = %slot.name, "control socket closed: guest removed");
    })?;
    Ok(())
}

fn accept_loop(daemon: &Arc<Daemon>, guest: &Arc<GuestSlot>, listener: OwnedFd) {
    loop {
        let accepted = vsocket_sys::accept(listener.as_fd());
        if guest.removed() {
            return;
        }
        let channel = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "accept on control socket failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if let Err(reason) = verify(guest, &channel) {
            guest.counters.refused_attachments.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(guest = %guest.name, %reason, "refused attachment");
            continue;
        }
        let Ok(held) = ChannelSlot::take(daemon, guest) else {
            drop(channel);
            let limit = Quota::Channels.limit(&daemon.policy().quotas(guest));
            daemon.note_exceeded(guest, Quota::Channels, limit, "control channel closed");
            continue;
        };
        let (daemon, guest) = (daemon.clone(), guest.clone());
        let spawned = std::thread::Builder::new().name("channel".into()).spawn(move || {
            let id = daemon.next_id();
            if !guest.hold(id, &channel) {
                return;
            }
            serve_channel(&daemon, &guest, id, channel);
            guest.release(id);
            drop(held);
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a channel thread");
        }
    }
}

/// One of a guest's `max_channels`, held by a channel's thread and given
/// back (to the slot it was taken from) when it is dropped: when the thread
/// ends, or if it cannot start.
struct ChannelSlot {
    guest: Arc<GuestSlot>,
}

impl ChannelSlot {
    fn take(daemon: &Daemon, guest: &Arc<GuestSlot>) -> Result<ChannelSlot, Quota> {
        guest.counters.quota.take_channel(&daemon.policy().quotas(guest))?;
        Ok(ChannelSlot { guest: guest.clone() })
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.guest.counters.quota.give_back_channel();
    }
}

/// Is the process behind `channel` inside the guest's network namespace?
fn verify(g: &GuestSlot, channel: &OwnedFd) -> Result<(), String> {
    let pid = vsocket_sys::peer_pid(channel.as_fd()).map_err(|e| format!("no peer credentials: {e}"))?;
    let expected = vsocket_sys::netns_id(&crate::netns_path(&g.netns))
        .map_err(|e| format!("guest namespace {} unavailable: {e}", g.netns))?;
    let actual = vsocket_sys::process_netns(pid).map_err(|e| format!("pid {pid}: cannot read its namespace: {e}"))?;
    if actual != expected {
        return Err(format!("pid {pid} is not in network namespace {}", g.netns));
    }
    Ok(())
}

/// The next request on a channel. The thread sleeps in the kernel: a
/// program waiting for the reply sleeps too, so the scheduler hands this
/// core to the channel thread directly (spinning here would only take a
/// core from the programs).
fn next_request(channel: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    vsocket_sys::recv_with_fds(channel.as_fd(), buf)
}

fn serve_channel(daemon: &Daemon, guest: &Arc<GuestSlot>, id: u64, channel: OwnedFd) {
    serve_requests(daemon, guest, id, channel);
    // The process is gone (or its channel became a listener's): segments
    // kept for its connections will not be asked for again.
    daemon.forget_pairs(|(client, _)| client == id);
}

/// How long a reply may wait for room in a request channel before the
/// channel is closed.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn serve_requests(daemon: &Daemon, guest: &Arc<GuestSlot>, id: u64, channel: OwnedFd) {
    let name = &guest.name;
    // The library reads every reply at once; a channel whose replies stay
    // unread would hold this thread in `send` for ever.
    if vsocket_sys::set_send_timeout(channel.as_fd(), REPLY_TIMEOUT).is_err() {
        return;
    }
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        let (n, fds) = match next_request(&channel, &mut buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(guest = %name, error = %e, "channel closed");
                return;
            }
        };
        if n == 0 {
            return;
        }
        if !fds.is_empty() {
            tracing::warn!(guest = %name, "descriptors on a request; closing the channel");
            return;
        }
        let message = match Message::decode(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(guest = %name, error = %e, "malformed control message; closing the channel");
                return;
            }
        };
        match message {
            Message::Connect { local, remote } => {
                let reply = broker::connect(daemon, guest, id, local, remote);
                if let Err(e) = send(&channel, &reply.message, &reply.fds) {
                    tracing::warn!(guest = %name, error = %e, "reply not taken; closing the channel");
                    return;
                }
            }
            Message::Listen { local, backlog: _ } => {
                serve_listener(daemon, guest, channel, local);
                return;
            }
            other => {
                tracing::warn!(guest = %name, message = ?other, "unexpected control message; closing the channel");
                return;
            }
        }
    }
}

/// The channel becomes a listener channel: register, then wait for the
/// program to close it (or exit) and unregister.
fn serve_listener(daemon: &Daemon, guest: &Arc<GuestSlot>, channel: OwnedFd, local: std::net::SocketAddrV4) {
    let name = &guest.name;
    let watcher = match channel.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let record = match broker::listen(daemon, guest, local, channel) {
        Ok(r) => r,
        Err(errno) => {
            let _ = send(&watcher, &Message::Refused { errno }, &[]);
            return;
        }
    };
    daemon.add_listener(record.clone());
    if send(&watcher, &Message::ListenOk, &[]).is_err() {
        daemon.remove_listener(&record);
        return;
    }
    tracing::info!(guest = %name, address = %local, "listener registered");
    let mut buf = [0u8; MAX_MESSAGE];
    // Nothing more is expected from the program on this channel: its end of
    // stream (or anything else) ends the listener.
    let _ = vsocket_sys::recv_with_fds(watcher.as_fd(), &mut buf);
    daemon.remove_listener(&record);
    daemon.forget_pairs(|(_, listener)| listener == record.id);
    tracing::info!(guest = %name, address = %local, "listener closed");
}

fn send(channel: &OwnedFd, message: &Message, fds: &[OwnedFd]) -> io::Result<()> {
    let mut buf = [0u8; MAX_MESSAGE];
    let bytes = message.encode(&mut buf);
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    vsocket_sys::send_with_fds(channel.as_fd(), bytes, &borrowed)
}
