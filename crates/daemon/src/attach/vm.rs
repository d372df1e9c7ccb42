//! The VM attachment: a guest that is a virtual machine.
//!
//! Each VM guest has a vsock device whose backend, vhost-device-vsock,
//! this daemon runs for it alone (with the guest's context id, so packets
//! with another source are dropped, and on a path of that VM's own, so no
//! other VM reaches it). A stream a process in the VM opens to the host's
//! [`CONTROL_PORT`] arrives on the unix socket `<uds>_<port>` that this
//! attachment listens on: the VM is known by the socket the stream came
//! to, never by what it says. Control messages are framed on the stream
//! (`vsocket_abi::stream`); no descriptors travel.
//!
//! The attachment also makes the VM's memory region (a file of the
//! guest's `region` size, which QEMU maps as the VM's ivshmem device):
//! each of the VM's connections is placed in a piece of it
//! ([`ConnectionMemory::Region`]), and `ConnectedAt` tells the process
//! where. For each connection the process then opens a bell stream to
//! [`BELL_PORT`], which arrives on `<uds>_<BELL_PORT>`: its first bytes
//! name the connection and the end (a ninth byte: 0 client, 1 server), and
//! the bridge takes it from there (a VM can
//! name only its own connections: the bridge looks the id up among that
//! VM's). That listener's thread reads each stream's id in turn, for at
//! most [`BELL_ID_TIMEOUT`]: a VM that opens streams and says nothing
//! delays only its own connections.

use super::{Attachment, ConnectionMemory, ProcessChannel, RecvError, Refused, Request};
use crate::bridge::Bridge;
use crate::channel::{Channel, Handover};
use crate::guest::GuestSlot;
use crate::placed::VmMemory;
use crate::sync::lock;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vsocket_abi::control::Message;
use vsocket_abi::layout::Endpoint;
use vsocket_abi::stream::{frame, Deframer, BELL_PORT, CONTROL_PORT, MAX_FRAME};
use vsocket_admin::paths::{vm_paths, vm_port_path};
use vsocket_policy::VmGuest;

/// A VM guest's door: its vsock backend and the socket its streams to the
/// control port arrive on.
#[derive(Debug)]
pub struct VmAttachment {
    listener: UnixListener,
    memory: Arc<VmMemory>,
    backend: Mutex<Backend>,
}

/// How long a bell stream may take to name its connection.
pub const BELL_ID_TIMEOUT: Duration = Duration::from_secs(2);

/// The VM's vsock backend. It is started by the attachment's own thread
/// (its first accept), with `PR_SET_PDEATHSIG`, which is tied to the
/// thread that starts a process: it ends with that thread (the guest is
/// removed) or with the daemon, and never outlives them.
#[derive(Debug)]
enum Backend {
    NotStarted(Command),
    Running(Child),
    Failed,
}

impl VmAttachment {
    /// Makes VM guest `slot`'s files under `run_dir` (its region of
    /// `vm.region` bytes) and listens for its control streams; its vsock
    /// backend (`program`) starts when the attachment is served.
    pub fn open(
        run_dir: &Path,
        slot: &GuestSlot,
        vm: &VmGuest,
        program: &Path,
        bridge: Arc<Bridge>,
    ) -> io::Result<VmAttachment> {
        let paths = vm_paths(run_dir, &slot.name);
        std::fs::create_dir_all(&paths.dir)?;
        // Only the daemon (and QEMU, as root) opens what is in here: a
        // process that could connect to the control port's socket directly
        // would speak as the VM.
        vsocket_sys::chmod(&paths.dir, 0o700)?;
        let bells_path = vm_port_path(&paths.uds, BELL_PORT);
        for stale in [&paths.vhost, &vm_port_path(&paths.uds, CONTROL_PORT), &bells_path] {
            let _ = std::fs::remove_file(stale);
        }
        let memory = Arc::new(VmMemory::create(&paths.region, vm.region)?);
        // Made once per slot (VM guests are not changed live).
        let _ = slot.vm_memory.set(memory.clone());
        let listener = UnixListener::bind(vm_port_path(&paths.uds, CONTROL_PORT))?;
        let bells = UnixListener::bind(&bells_path)?;
        let name = slot.name.clone();
        let vm_memory = memory.clone();
        // VM guests are not removed live, so this thread lives as long as
        // the daemon.
        std::thread::Builder::new()
            .name(format!("bells-{name}"))
            .spawn(move || take_bells(&name, &bells, &vm_memory, &bridge))?;
        let mut command = Command::new(program);
        vsocket_sys::die_with_parent(&mut command);
        command
            .arg("--guest-cid")
            .arg(vm.cid.to_string())
            .arg("--socket")
            .arg(&paths.vhost)
            .arg("--uds-path")
            .arg(&paths.uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Ok(VmAttachment { listener, memory, backend: Mutex::new(Backend::NotStarted(command)) })
    }

    /// Starts the backend, once.
    fn start_backend(&self) -> io::Result<()> {
        let mut backend = lock(&self.backend);
        if let Backend::NotStarted(command) = &mut *backend {
            match command.spawn() {
                Ok(child) => *backend = Backend::Running(child),
                Err(e) => {
                    let program = command.get_program().to_string_lossy().into_owned();
                    *backend = Backend::Failed;
                    return Err(io::Error::new(e.kind(), format!("vsock backend {program}: {e}")));
                }
            }
        }
        Ok(())
    }
}

impl Drop for VmAttachment {
    fn drop(&mut self) {
        if let Backend::Running(child) = &mut *lock(&self.backend) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Attachment for VmAttachment {
    type Channel = VmChannel;

    fn accept(&self) -> io::Result<VmChannel> {
        self.start_backend()?;
        let (stream, _) = self.listener.accept()?;
        Ok(VmChannel { reading: Arc::new(Mutex::new(Reading::default())), stream, memory: self.memory.clone() })
    }

    /// The backend delivered the stream from this VM: nothing to check.
    fn verify(&self, _guest: &GuestSlot, _channel: &VmChannel) -> Result<(), Refused> {
        Ok(())
    }

    fn handle(&self) -> io::Result<OwnedFd> {
        self.listener.as_fd().try_clone_to_owned()
    }
}

/// Bytes of a VM's stream read and not yet taken as a message.
#[derive(Debug, Default)]
struct Reading {
    deframer: Deframer,
    pending: Vec<u8>,
}

/// One process's control stream from a VM.
#[derive(Debug)]
pub struct VmChannel {
    stream: UnixStream,
    /// Shared with the channel's clones: one reader at a time.
    reading: Arc<Mutex<Reading>>,
    memory: Arc<VmMemory>,
}

impl Channel for VmChannel {
    fn send(&self, message: &Message, handover: Option<Handover<'_>>) -> io::Result<()> {
        if handover.is_some() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "a VM's control stream carries no descriptors"));
        }
        let mut buf = [0u8; MAX_FRAME];
        (&self.stream).write_all(frame(message, &mut buf))
    }
}

impl ProcessChannel for VmChannel {
    fn next_message(&self) -> Result<Option<Request>, RecvError> {
        let mut reading = lock(&self.reading);
        let Reading { deframer, pending } = &mut *reading;
        loop {
            while !pending.is_empty() {
                let took = deframer.extend(pending);
                pending.drain(..took);
                if let Some(message) = deframer.next_message().map_err(RecvError::Framing)? {
                    return Ok(Some(Request { message, proof: None }));
                }
            }
            let mut chunk = [0u8; 256];
            let n = (&self.stream).read(&mut chunk).map_err(RecvError::Io)?;
            if n == 0 {
                return Ok(None);
            }
            pending.extend_from_slice(&chunk[..n]);
        }
    }

    fn handle(&self) -> io::Result<OwnedFd> {
        self.stream.as_fd().try_clone_to_owned()
    }

    fn set_send_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.stream.set_write_timeout(Some(timeout))
    }

    fn try_clone(&self) -> io::Result<VmChannel> {
        Ok(VmChannel { stream: self.stream.try_clone()?, reading: self.reading.clone(), memory: self.memory.clone() })
    }

    fn memory(&self) -> ConnectionMemory {
        ConnectionMemory::Region(self.memory.clone())
    }
}

/// Takes VM `name`'s bell streams: reads the connection id each starts
/// with and hands the stream to the bridge.
fn take_bells(name: &str, bells: &UnixListener, memory: &Arc<VmMemory>, bridge: &Bridge) {
    loop {
        let mut stream = match bells.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::error!(guest = %name, error = %e, "accept on a VM's bell socket failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut named = [0u8; 9];
        let read = stream.set_read_timeout(Some(BELL_ID_TIMEOUT)).and_then(|()| stream.read_exact(&mut named));
        let end = match (read, named[8]) {
            (Ok(()), 0) => Endpoint::Client,
            (Ok(()), 1) => Endpoint::Server,
            (Ok(()), other) => {
                tracing::warn!(guest = %name, end = other, "a bell stream named no end of a connection; closed");
                continue;
            }
            (Err(e), _) => {
                tracing::warn!(guest = %name, error = %e, "a bell stream named no connection; closed");
                continue;
            }
        };
        if stream.set_read_timeout(None).and_then(|()| stream.set_nonblocking(true)).is_err() {
            continue;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&named[..8]);
        let id = u64::from_le_bytes(id);
        bridge.bell(id, end, memory.clone(), stream.into());
    }
}
