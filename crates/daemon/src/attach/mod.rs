//! Guest attachments: how a guest's processes reach the daemon and prove
//! who they are.
//!
//! A guest's identity comes from the attachment, never from what its
//! processes say. An [`Attachment`] is one guest's door: it accepts
//! processes and proves each is the guest's (today [`namespace`]: a unix
//! socket per guest, checked by network namespace), or the process is
//! refused and the refusal logged and counted. Each accepted process gets
//! a [`ProcessChannel`] and a thread; a malformed message closes that
//! channel only.
//!
//! Guests come and go with live policy changes (`crate::live`): a new
//! guest's attachment is made and served by [`serve`]; a removed guest's
//! slot shuts its attachment and channels down
//! ([`GuestSlot::remove`]), which ends their threads.
//!
//! A guest may have `max_channels` channels (threads) at once (the limit
//! of the policy in force when a channel is accepted; what is held is
//! counted in the guest's slot). Past that the daemon closes a new channel
//! at once, counted and logged: the library treats a closed channel as an
//! unreachable daemon, so that process's connects take the kernel path and
//! that socket listens on the kernel only, as it would without vSocket.
//! Other guests are not touched.

pub mod namespace;
pub mod vm;

use crate::channel::Channel;
use crate::connect::{self, LISTENER_SEND_TIMEOUT};
use crate::daemon::Daemon;
use crate::guest::{GuestSlot, Handle};
use crate::ids::{ChannelId, ConnectionId};
use crate::quota::Quota;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use vsocket_abi::control::Message;

/// One guest's door to the daemon.
pub trait Attachment: Send + 'static {
    type Channel: ProcessChannel;
    /// Waits for the next process.
    fn accept(&self) -> io::Result<Self::Channel>;
    /// Checks that the process behind `channel` is guest `guest`'s.
    fn verify(&self, guest: &GuestSlot, channel: &Self::Channel) -> Result<(), Refused>;
    /// A handle whose shutdown ends [`accept`](Self::accept) (see
    /// [`GuestSlot::remove`]).
    fn handle(&self) -> io::Result<OwnedFd>;
}

/// One attached process's channel.
pub trait ProcessChannel: Channel + Sized + 'static {
    /// The next request; `None` at end of stream.
    fn next_message(&self) -> Result<Option<Request>, RecvError>;
    /// Sends `Reattached` with an end's two segment halves, or
    /// `ReattachedAt` with a kit's chunk files and which `piece`
    /// (see [`crate::reattach`]); a channel that carries no descriptors
    /// cannot.
    fn send_halves(&self, _halves: [BorrowedFd<'_>; 2], _piece: Option<u8>) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this channel carries no descriptors"))
    }
    /// A handle whose shutdown ends the channel (see [`GuestSlot::remove`]).
    fn handle(&self) -> io::Result<OwnedFd>;
    /// Bounds how long a send may wait for the process to make room.
    fn set_send_timeout(&self, timeout: Duration) -> io::Result<()>;
    /// Another handle on the same channel.
    fn try_clone(&self) -> io::Result<Self>;
    /// How a connection's memory reaches this channel's process.
    fn memory(&self) -> ConnectionMemory {
        ConnectionMemory::Descriptors
    }
}

/// A request, with the descriptor that came with it (a `Reattach`'s
/// lifeline, the only request that takes one).
#[derive(Debug)]
pub struct Request {
    pub message: Message,
    pub proof: Option<OwnedFd>,
}

/// How a connection's memory reaches a process.
#[derive(Debug, Clone)]
pub enum ConnectionMemory {
    /// Its segment's descriptors travel with the message (a namespace
    /// guest's process).
    Descriptors,
    /// It is placed in the VM's region, and the message says where (a VM
    /// guest's process).
    Region(Arc<crate::placed::VmMemory>),
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum RecvError {
    /// The channel failed: {0}
    Io(io::Error),
    /// Descriptors came with a request that takes none (or too many).
    Descriptors,
    /// A stream's frame is not a message.
    Framing(vsocket_abi::stream::FrameError),
    /// A request is not a valid message.
    Malformed(vsocket_abi::control::DecodeError),
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Io(e) => write!(f, "the channel failed: {e}"),
            RecvError::Descriptors => f.write_str("descriptors on a request"),
            RecvError::Framing(e) => write!(f, "a malformed frame: {e}"),
            RecvError::Malformed(e) => write!(f, "malformed control message: {e}"),
        }
    }
}

/// Why a process was refused at a guest's attachment.
#[derive(Debug)]
pub enum Refused {
    /// The process's credentials could not be read.
    NoCredentials(io::Error),
    /// The guest's network namespace could not be read.
    NamespaceUnavailable { netns: String, error: io::Error },
    /// The process's network namespace could not be read.
    ProcessUnreadable { pid: i32, error: io::Error },
    /// The process lives in another network namespace.
    OtherNamespace { pid: i32, netns: String },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NoCredentials(e) => write!(f, "no peer credentials: {e}"),
            Refused::NamespaceUnavailable { netns, error } => {
                write!(f, "guest namespace {netns} unavailable: {error}")
            }
            Refused::ProcessUnreadable { pid, error } => write!(f, "pid {pid}: cannot read its namespace: {error}"),
            Refused::OtherNamespace { pid, netns } => write!(f, "pid {pid} is not in network namespace {netns}"),
        }
    }
}

impl std::error::Error for Refused {}

/// Serves guest `slot`'s `attachment` on its own thread, until the guest
/// is removed.
pub fn serve<A: Attachment>(daemon: &Arc<Daemon>, slot: &Arc<GuestSlot>, attachment: A) -> io::Result<()> {
    if !slot.hold(Handle::Control, &attachment.handle()?) {
        return Ok(());
    }
    let (daemon, slot) = (daemon.clone(), slot.clone());
    std::thread::Builder::new().name(format!("attach-{}", slot.name)).spawn(move || {
        accept_loop(&daemon, &slot, attachment);
        tracing::info!(guest = %slot.name, "control socket closed: guest removed");
    })?;
    Ok(())
}

fn accept_loop<A: Attachment>(daemon: &Arc<Daemon>, guest: &Arc<GuestSlot>, attachment: A) {
    loop {
        // A daemon that handed over takes no more processes: they are the
        // successor's, which serves the same control socket.
        drop(daemon.serving());
        let accepted = attachment.accept();
        if guest.removed() {
            return;
        }
        let channel = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "accept on control socket failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(reason) = attachment.verify(guest, &channel) {
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
            let id = daemon.ids.channel();
            let handle = Handle::Channel(id);
            if !channel.handle().is_ok_and(|h| guest.hold(handle, &h)) {
                return;
            }
            serve_channel(&daemon, &guest, id, channel);
            guest.release(handle);
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

fn serve_channel<C: ProcessChannel>(daemon: &Daemon, guest: &Arc<GuestSlot>, id: ChannelId, channel: C) {
    daemon.segments.channel_opened(id);
    serve_requests(daemon, guest, id, channel);
    // The process is gone (or its channel became a listener's): segments
    // kept for its connections will not be asked for again, and its
    // grants end.
    daemon.segments.channel_closed(id);
    crate::kits::channel_closed(daemon, id);
}

/// How long a reply may wait for room in a request channel before the
/// channel is closed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

fn serve_requests<C: ProcessChannel>(daemon: &Daemon, guest: &Arc<GuestSlot>, id: ChannelId, channel: C) {
    let name = &guest.name;
    // The library reads every reply at once; a channel whose replies stay
    // unread would hold this thread in `send` for ever.
    if channel.set_send_timeout(REPLY_TIMEOUT).is_err() {
        return;
    }
    loop {
        // The thread sleeps in the kernel: a program waiting for the reply
        // sleeps too, so the scheduler hands this core to the channel
        // thread directly (spinning here would only take a core from the
        // programs).
        let message = match channel.next_message() {
            Ok(None) => return,
            Ok(Some(request)) => request,
            Err(RecvError::Io(e)) => {
                tracing::debug!(guest = %name, error = %e, "channel closed");
                return;
            }
            Err(e) => {
                tracing::warn!(guest = %name, "{e}; closing the channel");
                return;
            }
        };
        let Request { message, proof } = message;
        match message {
            // Not under `serving`: it only reads the table, and the proof it
            // examines (and drops) is the guest's, whatever that file is.
            Message::Reattach { id, end } => {
                let sent = match crate::reattach::halves(daemon, guest, ConnectionId(id), end, proof) {
                    Ok((files, piece)) => channel.send_halves(files.each_ref().map(|f| f.as_fd()), piece),
                    Err(refusal) => {
                        tracing::info!(guest = %name, connection = id, "halves not sent again: {refusal}");
                        channel.send(&Message::Refused { errno: refusal.errno() }, None)
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!(guest = %name, error = %e, "reply not taken; closing the channel");
                    return;
                }
            }
            Message::Connect { local, remote }
            | Message::ConnectKits { local, remote }
            | Message::ConnectKitsV1 { local, remote }
            | Message::ConnectKitsV2 { local, remote }
            | Message::ConnectKitsV3 { local, remote } => {
                let _serving = daemon.serving();
                daemon.announce_kits_of(id);
                let memory = channel.memory();
                let client = match &memory {
                    ConnectionMemory::Descriptors => connect::ClientEnd::Process(id),
                    ConnectionMemory::Region(vm) => connect::ClientEnd::Vm(vm),
                };
                let reply = connect::connect(daemon, guest, client, local, remote);
                let batch = match (&message, &reply.message, &reply.listener) {
                    (Message::ConnectKits { .. }, Message::Connected(info), Some(listener)) => {
                        crate::kits::for_connect(daemon, guest, id, listener, *info.local.ip(), remote)
                            .map(|batch| (*info, batch))
                    }
                    _ => None,
                };
                let handover = reply.handover.as_ref().map(|files| files.handover());
                let sent = match (batch, handover) {
                    (Some((info, batch)), Some(handover)) => match batch.fds() {
                        Ok(batch_fds) => {
                            let mut fds = handover.fds().to_vec();
                            fds.extend(batch_fds);
                            channel.send_fds(&Message::ConnectedKits { info, grant: batch.grant }, &fds)
                        }
                        // The kits, which nobody holds, are retired by the
                        // reaper; the connection goes as `Connected`.
                        Err(_) => channel.send(&reply.message, Some(handover)),
                    },
                    (_, handover) => channel.send(&reply.message, handover),
                };
                if let Err(e) = sent {
                    tracing::warn!(guest = %name, error = %e, "reply not taken; closing the channel");
                    return;
                }
            }
            Message::Listen { local, backlog: _ }
            | Message::ListenKitsV1 { local, backlog: _ }
            | Message::ListenKitsV2 { local, backlog: _ }
            | Message::ListenKitsV3 { local, backlog: _ } => {
                serve_listener(daemon, guest, channel, local, false);
                return;
            }
            Message::ListenKits { local, backlog: _ } => {
                serve_listener(daemon, guest, channel, local, true);
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
fn serve_listener<C: ProcessChannel>(
    daemon: &Daemon,
    guest: &Arc<GuestSlot>,
    channel: C,
    local: std::net::SocketAddrV4,
    kits: bool,
) {
    let name = &guest.name;
    let Ok(watcher) = channel.try_clone() else { return };
    let serving = daemon.serving();
    // A listener that stops accepting must not hold a connecting client
    // (and its channel thread) forever: its backlog is full, the connect
    // is refused.
    let timed = channel.set_send_timeout(LISTENER_SEND_TIMEOUT);
    let vm = match channel.memory() {
        ConnectionMemory::Region(vm) => Some(vm),
        ConnectionMemory::Descriptors => None,
    };
    // A library that takes kits gets the listener's bell and kit channel,
    // where its channel carries descriptors.
    let kit_ends = match (kits, &vm) {
        (true, None) => vsocket_sys::stream_pair().ok().zip(vsocket_sys::seqpacket_pair_nonblocking_first().ok()),
        _ => None,
    };
    let (library_ends, daemon_ends) = match kit_ends {
        Some(((bell_read, bell_write), (ours, theirs))) => (Some((bell_read, theirs)), Some((bell_write, ours))),
        None => (None, None),
    };
    let registered = match timed {
        Ok(()) => connect::listen(daemon, guest, local, Box::new(channel), vm, daemon_ends),
        Err(_) => Err(connect::ListenError::Channel),
    };
    let record = match registered {
        Ok(r) => r,
        Err(refused) => {
            let _ = watcher.send(&Message::Refused { errno: refused.errno() }, None);
            return;
        }
    };
    daemon.segments.listener_opened(record.id);
    daemon.listeners.add(record.clone());
    let ok = match &library_ends {
        Some((bell, kit_channel)) => watcher.send_fds(&Message::ListenOkKits, &[bell.as_fd(), kit_channel.as_fd()]),
        None => watcher.send(&Message::ListenOk, None),
    };
    drop(library_ends);
    if ok.is_err() {
        daemon.listeners.remove(&record);
        daemon.segments.listener_closed(record.id);
        return;
    }
    tracing::info!(guest = %name, address = %local, "listener registered");
    drop(serving);
    // Nothing more is expected from the program on this channel but
    // `NoKits`: its end of stream (or anything else) ends the listener.
    while let Ok(Some(Request { message: Message::NoKits, .. })) = watcher.next_message() {
        crate::kits::listener_takes_no_kits(daemon, &record);
    }
    daemon.listeners.remove(&record);
    daemon.segments.listener_closed(record.id);
    crate::kits::listener_closed(daemon, record.id);
    if let (Some(_), Some(bridge)) = (&record.vm, daemon.bridge.get()) {
        bridge.listener_closed(record.id);
    }
    tracing::info!(guest = %name, address = %local, "listener closed");
}

/// Makes every local guest's attachment and serves each on its own
/// thread. A guest whose control socket a predecessor handed over (in
/// `inherited`, by guest name) is served on that socket, with whatever
/// processes wait in its backlog.
pub fn serve_guests(daemon: &Arc<Daemon>, mut inherited: HashMap<String, OwnedFd>) -> io::Result<()> {
    let policy = daemon.policy();
    let run_dir = &policy.config.host().run_dir;
    // Guests placed on other hosts attach to their own hosts' daemons.
    for slot in policy.slots().iter().filter(|slot| slot.local) {
        let vm = policy.guest_id(slot).and_then(|id| policy.config.guest(id).vm);
        if let Some(vm) = vm {
            let program = &policy.config.host().vsock_backend;
            if daemon.bridge.get().is_none() {
                // Only this thread starts it; a second set cannot happen.
                let _ = daemon.bridge.set(Arc::new(crate::bridge::Bridge::start()?));
            }
            let bridge = daemon.bridge.get().cloned().ok_or_else(|| io::Error::other("no bridge"))?;
            serve(daemon, slot, vm::VmAttachment::open(run_dir, slot, &vm, program, bridge)?)?;
            continue;
        }
        let attachment = match inherited.remove(&slot.name) {
            Some(socket) => namespace::NamespaceAttachment::inherit(socket),
            None => namespace::NamespaceAttachment::open(run_dir, slot)?,
        };
        serve(daemon, slot, attachment)?;
    }
    Ok(())
}
