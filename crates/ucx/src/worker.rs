//! The safe [`Worker`]: one UCP context and worker, its listener and
//! endpoints, and the callbacks UCX calls back into.
//!
//! Callback state lives in one heap allocation, `Shared`, whose address is
//! handed to UCX as the `arg`/`user_data` of every callback. Rust code only
//! ever holds `&Shared` (never `&mut`), and its mutable parts are `Cell`s and
//! `RefCell`s that are never borrowed across a call into UCX, so a callback
//! that UCX runs inside such a call may borrow them itself.
//!
//! UCX runs a worker's user callbacks only from inside calls made on that
//! worker (progress, send, close, destroy): failures, connection requests
//! and completions that its internal thread notices are queued to the next
//! progress. Every such call is made inside `UcxCall`, and every callback
//! checks that it runs inside one on the same thread, aborting otherwise,
//! because `Shared` is not thread-safe.

use crate::reorder::Reorder;
use crate::sys::*;
use libc::{c_uint, c_void, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The one active message id this crate sends and handles.
const FRAME_AM_ID: c_uint = 0;
/// The active message header: the frame's sequence number on its endpoint.
const HEADER_LEN: usize = 8;
/// The largest frame [`Worker::send`] accepts and a peer may announce; a
/// larger announcement fails the endpoint instead of allocating it.
pub const MAX_FRAME_LEN: usize = 16 << 20;
/// Bytes of copied frames on one endpoint that UCX may still be sending
/// before [`Worker::send`] waits for some to complete.
const SEND_WINDOW: usize = 8 << 20;

/// Send buffers kept for reuse: enough for the sends UCX usually holds at
/// once, so that steady sending allocates nothing.
const SPARE_BUFFERS: usize = 16;

/// `ucp_init`, `ucp_worker_create` and their teardown touch UCX's
/// process-wide configuration and module tables; they are serialised here
/// because UCX does not document them as thread-safe.
static GLOBAL_SETUP: Mutex<()> = Mutex::new(());

/// An endpoint of one [`Worker`]: a connection to one peer worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EpId(u64);

impl fmt::Display for EpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ep{}", self.0)
    }
}

/// What a worker has to report, in the order it happened.
#[derive(Debug)]
pub enum Event {
    /// A peer connected to this worker's listener; `peer` is its address
    /// when UCX could tell it.
    Accepted { ep: EpId, peer: Option<SocketAddr> },
    /// One frame, delivered in the order the peer sent them on `ep`.
    Frame { ep: EpId, frame: Vec<u8> },
    /// The endpoint is broken (peer gone, link cut, connect refused, or the
    /// peer closed it): nothing more will arrive on it, sends to it fail,
    /// and it should be [`Worker::close`]d.
    Failed { ep: EpId, error: io::Error },
}

/// How [`Worker::close`] ends an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseMode {
    /// Finish sending what was queued, then disconnect.
    Flush,
    /// Drop what is queued and disconnect now; the peer sees a failure.
    Force,
}

/// A UCX error, as the `source` of the `io::Error`s this crate returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UcxError {
    status: ucs_status_t,
}

impl UcxError {
    /// The raw `ucs_status_t`.
    pub fn status(&self) -> i8 {
        self.status
    }
}

impl fmt::Display for UcxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: ucs_status_string accepts any status and returns a pointer
        // to a static NUL-terminated string (or "Unknown error").
        let text = unsafe { CStr::from_ptr(ucs_status_string(self.status)) };
        write!(f, "UCX: {} ({})", text.to_string_lossy(), self.status)
    }
}

impl std::error::Error for UcxError {}

fn ucx_error(status: ucs_status_t) -> io::Error {
    let kind = match status {
        UCS_ERR_CONNECTION_RESET => io::ErrorKind::ConnectionReset,
        UCS_ERR_NOT_CONNECTED => io::ErrorKind::NotConnected,
        UCS_ERR_REJECTED | UCS_ERR_UNREACHABLE => io::ErrorKind::ConnectionRefused,
        UCS_ERR_TIMED_OUT | UCS_ERR_ENDPOINT_TIMEOUT => io::ErrorKind::TimedOut,
        UCS_ERR_NO_MEMORY => io::ErrorKind::OutOfMemory,
        UCS_ERR_INVALID_PARAM | UCS_ERR_INVALID_ADDR => io::ErrorKind::InvalidInput,
        UCS_ERR_BUSY | UCS_ERR_ALREADY_EXISTS => io::ErrorKind::AddrInUse,
        UCS_ERR_UNSUPPORTED | UCS_ERR_NOT_IMPLEMENTED => io::ErrorKind::Unsupported,
        UCS_ERR_LAST_LINK_FAILURE..=UCS_ERR_FIRST_LINK_FAILURE => io::ErrorKind::ConnectionAborted,
        UCS_ERR_LAST_ENDPOINT_FAILURE..=UCS_ERR_FIRST_ENDPOINT_FAILURE => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, UcxError { status })
}

fn check(status: ucs_status_t) -> io::Result<()> {
    if status == UCS_OK {
        Ok(())
    } else {
        Err(ucx_error(status))
    }
}

/// UCX settings for one worker, applied with `ucp_config_modify` on top of
/// the `UCX_*` environment variables (which it reads as usual).
#[derive(Debug, Clone, Default)]
pub struct Config {
    settings: Vec<(CString, CString)>,
}

impl Config {
    /// The environment's settings, unchanged.
    pub fn new() -> Config {
        Config::default()
    }

    /// Sets one UCP/UCT option by its name without the `UCX_` prefix, e.g.
    /// `set("TLS", "tcp")` or `set("KEEPALIVE_INTERVAL", "1s")`.
    pub fn set(mut self, name: &str, value: &str) -> Config {
        let name = CString::new(name).expect("UCX option names contain no NUL");
        let value = CString::new(value).expect("UCX option values contain no NUL");
        self.settings.push((name, value));
        self
    }
}

thread_local! {
    /// True while this thread is inside a call into UCX made by [`UcxCall`].
    static IN_UCX_CALL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the span of one call into UCX that may run this crate's callbacks.
struct UcxCall {
    outer: bool,
}

impl UcxCall {
    fn enter() -> UcxCall {
        UcxCall { outer: IN_UCX_CALL.with(|c| c.replace(true)) }
    }
}

impl Drop for UcxCall {
    fn drop(&mut self) {
        IN_UCX_CALL.with(|c| c.set(self.outer));
    }
}

/// Called first by every callback: `Shared` may only be touched from the
/// thread that is inside a call on its worker.
fn assert_in_ucx_call() {
    if !IN_UCX_CALL.with(Cell::get) {
        eprintln!("vsocket-ucx: UCX ran a callback outside a call on its worker; aborting");
        std::process::abort();
    }
}

struct Endpoint {
    handle: ucp_ep_h,
    next_send: u64,
    reorder: Reorder,
    /// A failure was reported; the endpoint only awaits its close.
    failed: bool,
    /// [`Worker::close`] is under way: report nothing more.
    closing: bool,
    /// Bytes of frames handed to UCX whose send has not completed.
    sending: usize,
}

/// State the callbacks share with the worker (see the module docs).
struct Shared {
    worker: ucp_worker_h,
    events: RefCell<VecDeque<Event>>,
    endpoints: RefCell<HashMap<EpId, Endpoint>>,
    by_handle: RefCell<HashMap<usize, EpId>>,
    conn_requests: RefCell<VecDeque<ucp_conn_request_h>>,
    next_ep: Cell<u64>,
    /// Send and receive contexts owned by UCX requests, by address. UCX
    /// does not complete every request of an endpoint that failed (it warns
    /// about them when the worker is destroyed), so whatever is left here
    /// after `ucp_worker_destroy` is freed then.
    in_flight_sends: RefCell<HashSet<usize>>,
    in_flight_receives: RefCell<HashSet<usize>>,
    /// Buffers of completed sends, kept for the next (see [`Worker::buffer`]).
    spare: RefCell<Vec<Vec<u8>>>,
}

impl Shared {
    fn register(&self, handle: ucp_ep_h) -> EpId {
        let id = EpId(self.next_ep.get());
        self.next_ep.set(id.0 + 1);
        let endpoint =
            Endpoint { handle, next_send: 0, reorder: Reorder::default(), failed: false, closing: false, sending: 0 };
        self.endpoints.borrow_mut().insert(id, endpoint);
        self.by_handle.borrow_mut().insert(handle as usize, id);
        id
    }

    /// Keeps a completed send's buffer for a later one.
    fn recycle(&self, mut buffer: Vec<u8>) {
        let mut spare = self.spare.borrow_mut();
        if spare.len() < SPARE_BUFFERS {
            buffer.clear();
            spare.push(buffer);
        }
    }

    fn lookup(&self, handle: ucp_ep_h) -> Option<EpId> {
        self.by_handle.borrow().get(&(handle as usize)).copied()
    }

    /// Reports `ep` as failed, once, unless it is being closed.
    fn fail(&self, ep: EpId, error: io::Error) {
        let report = match self.endpoints.borrow_mut().get_mut(&ep) {
            Some(endpoint) if !endpoint.failed => {
                endpoint.failed = true;
                !endpoint.closing
            }
            _ => false,
        };
        if report {
            self.events.borrow_mut().push_back(Event::Failed { ep, error });
        }
    }

    fn announce(&self, ep: EpId, seq: u64) -> bool {
        let result = match self.endpoints.borrow_mut().get_mut(&ep) {
            Some(endpoint) => endpoint.reorder.announce(seq),
            None => return false,
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                self.fail(ep, out_of_sequence(e));
                false
            }
        }
    }

    /// Stores frame `seq` of `ep` and queues every frame now in order.
    fn deliver(&self, ep: EpId, seq: u64, frame: Vec<u8>) {
        let mut ready = Vec::new();
        let result = match self.endpoints.borrow_mut().get_mut(&ep) {
            Some(endpoint) if !endpoint.failed && !endpoint.closing => {
                let result = endpoint.reorder.complete(seq, frame);
                while let Some(frame) = endpoint.reorder.pop_ready() {
                    ready.push(frame);
                }
                result
            }
            _ => return,
        };
        let mut events = self.events.borrow_mut();
        events.extend(ready.into_iter().map(|frame| Event::Frame { ep, frame }));
        drop(events);
        if let Err(e) = result {
            self.fail(ep, out_of_sequence(e));
        }
    }
}

fn out_of_sequence(e: crate::reorder::OutOfSequence) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("peer sent frame {} while frame {} was due", e.seq, e.next))
}

/// A frame copied for UCX to send: owned by UCX (through the request's
/// callback) from a send that returns a request until that callback runs.
struct SendCtx {
    shared: *const Shared,
    ep: EpId,
    header: [u8; HEADER_LEN],
    data: Vec<u8>,
}

/// The buffer of a rendezvous receive, owned by its callback likewise.
struct RecvCtx {
    shared: *const Shared,
    ep: EpId,
    seq: u64,
    buf: Vec<u8>,
}

/// One UCP context and worker with at most one listener, carrying frames
/// over endpoints; see the crate docs for the event loop it expects.
///
/// `Send` but not `Sync`: the worker is created in
/// `UCS_THREAD_MODE_SERIALIZED`, so any one thread at a time may use it.
pub struct Worker {
    context: ucp_context_h,
    worker: ucp_worker_h,
    listener: Option<ucp_listener_h>,
    /// From `Box::into_raw`; freed in `Drop` after the worker is destroyed,
    /// which is when UCX stops calling back.
    shared: *const Shared,
    event_fd: RawFd,
    _not_sync: PhantomData<Cell<()>>,
}

// SAFETY: every UCX object here belongs to this Worker alone and was created
// with UCS_THREAD_MODE_SERIALIZED, which allows use from any thread as long
// as calls do not overlap; `&mut self` on every method that calls into UCX
// (and `!Sync`) guarantees that. `Shared` is only touched by the thread
// inside such a call (its callbacks check it), so moving the whole Worker to
// another thread moves every access with it.
unsafe impl Send for Worker {}

impl Worker {
    /// A worker configured by the `UCX_*` environment variables alone.
    pub fn new() -> io::Result<Worker> {
        Worker::with_config(&Config::new())
    }

    /// A worker with `config` applied over the environment's settings.
    pub fn with_config(config: &Config) -> io::Result<Worker> {
        let _setup = GLOBAL_SETUP.lock().unwrap_or_else(|e| e.into_inner());
        let context = create_context(config)?;
        let params = ucp_worker_params_t {
            field_mask: UCP_WORKER_PARAM_FIELD_THREAD_MODE | UCP_WORKER_PARAM_FIELD_FLAGS,
            thread_mode: UCS_THREAD_MODE_SERIALIZED,
            cpu_mask: ucs_cpu_set_t { ucs_bits: [0; 16] },
            events: 0,
            user_data: ptr::null_mut(),
            event_fd: -1,
            // UCX leaves some requests of failed endpoints uncompleted and
            // would list each of them when the worker is destroyed; their
            // contexts are reclaimed in Drop.
            flags: UCP_WORKER_FLAG_IGNORE_REQUEST_LEAK,
            name: ptr::null(),
            am_alignment: 0,
            client_id: 0,
        };
        let mut worker = ptr::null_mut();
        // SAFETY: `context` is a live context; `params` is a valid
        // ucp_worker_params_t whose field_mask names only initialised fields;
        // `worker` is a valid out-pointer.
        let status = unsafe { ucp_worker_create(context, &params, &mut worker) };
        if let Err(e) = check(status) {
            // SAFETY: the context was created above and nothing uses it.
            unsafe { ucp_cleanup(context) };
            return Err(e);
        }
        let shared = Box::into_raw(Box::new(Shared {
            worker,
            events: RefCell::default(),
            endpoints: RefCell::default(),
            by_handle: RefCell::default(),
            conn_requests: RefCell::default(),
            next_ep: Cell::new(1),
            in_flight_sends: RefCell::default(),
            in_flight_receives: RefCell::default(),
            spare: RefCell::default(),
        }));
        // From here on, Drop tears down whatever was set up.
        let mut this = Worker { context, worker, listener: None, shared, event_fd: -1, _not_sync: PhantomData };
        let handler = ucp_am_handler_param_t {
            field_mask: UCP_AM_HANDLER_PARAM_FIELD_ID
                | UCP_AM_HANDLER_PARAM_FIELD_FLAGS
                | UCP_AM_HANDLER_PARAM_FIELD_CB
                | UCP_AM_HANDLER_PARAM_FIELD_ARG,
            id: FRAME_AM_ID,
            flags: UCP_AM_FLAG_WHOLE_MSG,
            cb: Some(on_frame),
            arg: shared as *mut c_void,
        };
        // SAFETY: the worker is live; `handler` is a valid parameter struct;
        // `on_frame` matches ucp_am_recv_callback_t and `arg` is the Shared
        // it expects, which outlives the worker (freed after its destroy).
        check(unsafe { ucp_worker_set_am_recv_handler(worker, &handler) })?;
        let mut fd = -1;
        // SAFETY: the worker is live and was created with UCP_FEATURE_WAKEUP;
        // `fd` is a valid out-pointer.
        check(unsafe { ucp_worker_get_efd(worker, &mut fd) })?;
        this.event_fd = fd;
        drop(_setup);
        Ok(this)
    }

    fn shared(&self) -> &Shared {
        // SAFETY: `shared` came from Box::into_raw in `with_config` and is
        // freed only in Drop; no `&mut Shared` is ever made.
        unsafe { &*self.shared }
    }

    /// Starts listening on `addr` (port 0 picks a free port; see
    /// [`listen_address`](Self::listen_address)). Peers that connect are
    /// reported as [`Event::Accepted`]. One listener per worker.
    pub fn listen(&mut self, addr: SocketAddr) -> io::Result<()> {
        if self.listener.is_some() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "this worker is already listening"));
        }
        let raw = RawSockAddr::new(addr);
        let params = ucp_listener_params_t {
            field_mask: UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER,
            sockaddr: raw.as_ucs(),
            accept_handler: ucp_listener_accept_handler_t { cb: None, arg: ptr::null_mut() },
            conn_handler: ucp_listener_conn_handler_t { cb: Some(on_conn_request), arg: self.shared as *mut c_void },
        };
        let mut listener = ptr::null_mut();
        let _call = UcxCall::enter();
        // `on_conn_request` matches ucp_listener_conn_callback_t and gets the
        // Shared it expects, which outlives the listener.
        // SAFETY: the worker is live; `params` is valid and its sockaddr
        // points into `raw`, alive for the call (UCX binds during it).
        check(unsafe { ucp_listener_create(self.worker, &params, &mut listener) })?;
        self.listener = Some(listener);
        Ok(())
    }

    /// The address the listener is bound to.
    pub fn listen_address(&self) -> io::Result<SocketAddr> {
        let listener =
            self.listener.ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "this worker is not listening"))?;
        let mut attr = ucp_listener_attr_t { field_mask: UCP_LISTENER_ATTR_FIELD_SOCKADDR, sockaddr: zeroed_storage() };
        // SAFETY: the listener is live; `attr` is a valid out-struct whose
        // field_mask asks for the one field it has room for.
        check(unsafe { ucp_listener_query(listener, &mut attr) })?;
        socket_addr(&attr.sockaddr)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "listener has a non-IP address"))
    }

    /// Connects to the worker listening on `addr`. Returns at once: frames
    /// may be sent right away (UCX queues them until the connection is up),
    /// and a connection that cannot be made is reported as
    /// [`Event::Failed`].
    pub fn connect(&mut self, addr: SocketAddr) -> io::Result<EpId> {
        let raw = RawSockAddr::new(addr);
        let mut params = self.ep_params();
        params.field_mask |= UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_FLAGS;
        params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
        params.sockaddr = raw.as_ucs();
        let mut handle = ptr::null_mut();
        let _call = UcxCall::enter();
        // SAFETY: the worker is live; `params` is valid (see ep_params), and
        // its sockaddr points into `raw`, alive for the call; UCX copies it.
        check(unsafe { ucp_ep_create(self.worker, &params, &mut handle) })?;
        Ok(self.shared().register(handle))
    }

    /// Endpoint parameters common to connecting and accepting: peer failures
    /// are reported to `on_ep_error` instead of hanging.
    fn ep_params(&self) -> ucp_ep_params_t {
        ucp_ep_params_t {
            field_mask: UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER,
            address: ptr::null(),
            err_mode: UCP_ERR_HANDLING_MODE_PEER,
            err_handler: ucp_err_handler_t { cb: Some(on_ep_error), arg: self.shared as *mut c_void },
            user_data: ptr::null_mut(),
            flags: 0,
            sockaddr: ucs_sock_addr_t { addr: ptr::null(), addrlen: 0 },
            conn_request: ptr::null_mut(),
            name: ptr::null(),
            local_sockaddr: ucs_sock_addr_t { addr: ptr::null(), addrlen: 0 },
        }
    }

    /// Turns connection requests queued by `on_conn_request` into endpoints.
    fn accept_pending(&mut self) {
        loop {
            let Some(request) = self.shared().conn_requests.borrow_mut().pop_front() else {
                return;
            };
            let mut attr = ucp_conn_request_attr_t {
                field_mask: UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR,
                client_address: zeroed_storage(),
                client_id: 0,
            };
            // SAFETY: `request` came from the conn handler and has not been
            // used for an endpoint or rejected yet; `attr` is a valid
            // out-struct asking for the one field it has room for.
            let peer = match unsafe { ucp_conn_request_query(request, &mut attr) } {
                UCS_OK => socket_addr(&attr.client_address),
                _ => None,
            };
            let mut params = self.ep_params();
            params.field_mask |= UCP_EP_PARAM_FIELD_CONN_REQUEST;
            params.conn_request = request;
            let mut handle = ptr::null_mut();
            let status = {
                let _call = UcxCall::enter();
                // SAFETY: the worker is live; `params` is valid and consumes
                // `request`, which UCX releases whether or not this succeeds.
                unsafe { ucp_ep_create(self.worker, &params, &mut handle) }
            };
            if status == UCS_OK {
                let ep = self.shared().register(handle);
                self.shared().events.borrow_mut().push_back(Event::Accepted { ep, peer });
            }
        }
    }

    /// Sends a copy of one frame on `ep` (see [`send_buffer`](Self::send_buffer)).
    pub fn send(&mut self, ep: EpId, frame: &[u8]) -> io::Result<()> {
        let mut buffer = self.buffer();
        buffer.extend_from_slice(frame);
        self.send_buffer(ep, buffer)
    }

    /// An empty buffer to build a frame in for [`send_buffer`](Self::send_buffer):
    /// one a completed send gave back when there is one.
    pub fn buffer(&mut self) -> Vec<u8> {
        self.shared().spare.borrow_mut().pop().unwrap_or_default()
    }

    /// Sends `frame` on `ep`, after every frame sent on it before. UCX
    /// sends from the buffer itself, which goes back to the worker's spares
    /// when the send completes.
    ///
    /// This returns once UCX owns the frame, waiting (and progressing the
    /// worker) only while more than a few MiB of earlier frames are still
    /// being sent. Events that arrive meanwhile are queued for
    /// [`poll_event`](Self::poll_event).
    pub fn send_buffer(&mut self, ep: EpId, frame: Vec<u8>) -> io::Result<()> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "frame larger than MAX_FRAME_LEN"));
        }
        while self.endpoint_usable(ep)? > SEND_WINDOW {
            self.progress_or_sleep(Duration::from_millis(10))?;
        }
        let (handle, seq) = {
            self.endpoint_usable(ep)?;
            let mut endpoints = self.shared().endpoints.borrow_mut();
            let endpoint = endpoints.get_mut(&ep).expect("checked by endpoint_usable");
            let seq = endpoint.next_send;
            endpoint.next_send += 1;
            // Counted before the call, as its callback subtracts it.
            endpoint.sending += frame.len();
            (endpoint.handle, seq)
        };
        let len = frame.len();
        let ctx = Box::into_raw(Box::new(SendCtx { shared: self.shared, ep, header: seq.to_le_bytes(), data: frame }));
        // The receiver learns which endpoint a frame came on only from the
        // reply endpoint UCP_AM_SEND_FLAG_REPLY makes UCX pass it.
        let callback = ucp_request_param_cb { send: Some(on_send_done) };
        let params = ucp_request_param_t::with_callback(callback, ctx.cast(), UCP_AM_SEND_FLAG_REPLY, true);
        self.shared().in_flight_sends.borrow_mut().insert(ctx as usize);
        let result = {
            let _call = UcxCall::enter();
            // If a request is returned, `on_send_done` (matching
            // ucp_send_nbx_callback_t) frees `*ctx`, otherwise it is freed below.
            // SAFETY: `handle` is a live endpoint of this worker (registered
            // until close completes); header and data point into `*ctx`, a
            // live heap allocation that stays put until the request completes.
            unsafe {
                ucp_am_send_nbx(
                    handle,
                    FRAME_AM_ID,
                    (*ctx).header.as_ptr().cast(),
                    HEADER_LEN,
                    (*ctx).data.as_ptr().cast(),
                    len,
                    &params,
                )
            }
        };
        match status_ptr(result) {
            StatusPtr::Request => Ok(()),
            done_or_error => {
                // SAFETY: no request was made, so no callback owns `ctx`; it
                // came from Box::into_raw above.
                let done = unsafe { Box::from_raw(ctx) };
                self.shared().recycle(done.data);
                self.shared().in_flight_sends.borrow_mut().remove(&(ctx as usize));
                if let Some(endpoint) = self.shared().endpoints.borrow_mut().get_mut(&ep) {
                    endpoint.sending -= len;
                }
                match done_or_error {
                    StatusPtr::Error(status) => {
                        let error = ucx_error(status);
                        self.shared().fail(ep, ucx_error(status));
                        Err(error)
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Checks that `ep` can send; returns the bytes it has in flight.
    fn endpoint_usable(&self, ep: EpId) -> io::Result<usize> {
        match self.shared().endpoints.borrow().get(&ep) {
            None => Err(io::Error::new(io::ErrorKind::NotFound, format!("no endpoint {ep}"))),
            Some(e) if e.closing => Err(io::Error::new(io::ErrorKind::NotConnected, format!("{ep} is closing"))),
            Some(e) if e.failed => Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("{ep} has failed"))),
            Some(e) => Ok(e.sending),
        }
    }

    /// Runs UCX's progress engine once and accepts queued connections;
    /// returns UCX's count of completed internal events (0: idle).
    pub fn progress(&mut self) -> u32 {
        let count = {
            let _call = UcxCall::enter();
            // SAFETY: the worker is live and this thread has `&mut self`.
            unsafe { ucp_worker_progress(self.worker) }
        };
        self.accept_pending();
        count
    }

    /// The oldest unreported event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.shared().events.borrow_mut().pop_front()
    }

    /// The worker's wakeup fd (owned by UCX, open as long as the worker):
    /// readable when [`arm`](Self::arm)ed and UCX has work to progress.
    pub fn event_fd(&self) -> RawFd {
        self.event_fd
    }

    /// Arms the event fd before sleeping on it. `Ok(false)` (UCX's
    /// `UCS_ERR_BUSY`) means work is already pending: progress and poll
    /// events again instead of sleeping. Only arm once
    /// [`poll_event`](Self::poll_event) has returned `None`.
    pub fn arm(&mut self) -> io::Result<bool> {
        let _call = UcxCall::enter();
        // SAFETY: the worker is live and was created with UCP_FEATURE_WAKEUP.
        match unsafe { ucp_worker_arm(self.worker) } {
            UCS_OK => Ok(true),
            UCS_ERR_BUSY => Ok(false),
            status => Err(ucx_error(status)),
        }
    }

    /// Runs the progress/arm/sleep loop until an event arrives or `timeout`
    /// passes (`None`: wait as long as it takes; zero: progress once).
    pub fn wait_event(&mut self, timeout: Option<Duration>) -> io::Result<Option<Event>> {
        if timeout == Some(Duration::ZERO) {
            if self.shared().events.borrow().is_empty() {
                self.progress();
            }
            return Ok(self.poll_event());
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(event) = self.poll_event() {
                return Ok(Some(event));
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => Some(left),
                    None => return Ok(None),
                },
                None => None,
            };
            self.progress_or_sleep(left.unwrap_or(Duration::from_secs(3600)))?;
        }
    }

    /// Progresses; if UCX was idle and no event is queued, sleeps on the
    /// event fd for at most `max`.
    fn progress_or_sleep(&mut self, max: Duration) -> io::Result<()> {
        if self.progress() > 0 || !self.shared().events.borrow().is_empty() {
            return Ok(());
        }
        if self.arm()? {
            wait_readable(self.event_fd, max)?;
        }
        Ok(())
    }

    /// Waits until every frame sent on `ep` so far has reached the peer
    /// (`ucp_ep_flush_nbx`), progressing the worker meanwhile. A frame
    /// [`send`](Self::send) accepted is only guaranteed to leave this host
    /// while the worker keeps being progressed; flush before a worker stops
    /// being progressed (or is dropped) if its last frames matter.
    pub fn flush(&mut self, ep: EpId) -> io::Result<()> {
        self.endpoint_usable(ep)?;
        let handle = self.shared().endpoints.borrow()[&ep].handle;
        // SAFETY: `handle` is a live endpoint (checked usable just above,
        // and endpoints are only released by `close`).
        let status = self.wait_for(0, |params| unsafe { ucp_ep_flush_nbx(handle, params) })?;
        check(status)
    }

    /// Starts one endpoint operation with a completion callback and waits
    /// for its status, progressing the worker.
    fn wait_for(
        &mut self,
        flags: u32,
        start: impl FnOnce(&ucp_request_param_t) -> ucs_status_ptr_t,
    ) -> io::Result<ucs_status_t> {
        let done: Rc<Cell<Option<ucs_status_t>>> = Rc::new(Cell::new(None));
        let done_for_callback = Rc::into_raw(Rc::clone(&done));
        let callback = ucp_request_param_cb { send: Some(on_request_done) };
        let params = ucp_request_param_t::with_callback(callback, done_for_callback as *mut c_void, flags, false);
        let result = {
            let _call = UcxCall::enter();
            start(&params)
        };
        match status_ptr(result) {
            StatusPtr::Request => loop {
                if let Some(status) = done.get() {
                    return Ok(status);
                }
                self.progress_or_sleep(Duration::from_millis(100))?;
            },
            other => {
                // SAFETY: no request was made, so `on_request_done` will not
                // run; this is the one use of the pointer from Rc::into_raw.
                drop(unsafe { Rc::from_raw(done_for_callback) });
                Ok(match other {
                    StatusPtr::Error(status) => status,
                    _ => UCS_OK,
                })
            }
        }
    }

    /// Closes `ep` and waits until UCX is done with it. A failed endpoint is
    /// always closed with [`CloseMode::Force`]. No event about `ep` is
    /// queued after this returns (earlier ones stay queued).
    pub fn close(&mut self, ep: EpId, mode: CloseMode) -> io::Result<()> {
        let (handle, force) = {
            let mut endpoints = self.shared().endpoints.borrow_mut();
            let endpoint = endpoints
                .get_mut(&ep)
                .filter(|e| !e.closing)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no endpoint {ep}")))?;
            endpoint.closing = true;
            (endpoint.handle, mode == CloseMode::Force || endpoint.failed)
        };
        let flags = if force { UCP_EP_CLOSE_FLAG_FORCE } else { 0 };
        // SAFETY: `handle` is a live endpoint that has not been closed
        // (`closing` was false); after this call it is only released.
        let status = self.wait_for(flags, |params| unsafe { ucp_ep_close_nbx(handle, params) });
        self.shared().endpoints.borrow_mut().remove(&ep);
        self.shared().by_handle.borrow_mut().remove(&(handle as usize));
        let status = status?;
        // A force close, or closing an endpoint that already failed, ends
        // with the failure it was closed for; that is what was asked for.
        if force || status == UCS_OK {
            Ok(())
        } else {
            Err(ucx_error(status))
        }
    }

    /// The endpoints not yet closed.
    pub fn endpoints(&self) -> Vec<EpId> {
        let mut eps: Vec<EpId> = self.shared().endpoints.borrow().keys().copied().collect();
        eps.sort();
        eps
    }
}

impl AsRawFd for Worker {
    fn as_raw_fd(&self) -> RawFd {
        self.event_fd
    }
}

impl AsFd for Worker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the event fd belongs to the worker, which UCX keeps open
        // until ucp_worker_destroy in Drop, after every borrow of self ends.
        unsafe { BorrowedFd::borrow_raw(self.event_fd) }
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("listening", &self.listener.is_some())
            .field("endpoints", &self.shared().endpoints.borrow().len())
            .finish()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The listener first, so that no endpoint is accepted meanwhile.
        if let Some(listener) = self.listener.take() {
            let _call = UcxCall::enter();
            while let Some(request) = self.shared().conn_requests.borrow_mut().pop_front() {
                // SAFETY: a pending request of this listener, still unused.
                unsafe { ucp_listener_reject(listener, request) };
            }
            // SAFETY: the listener is live and destroyed once.
            unsafe { ucp_listener_destroy(listener) };
        }
        for ep in self.endpoints() {
            let _ = self.close(ep, CloseMode::Force);
        }
        // Let UCX run the cleanup the closes queued before its worker goes.
        for _ in 0..1000 {
            if self.progress() == 0 {
                break;
            }
        }
        {
            let _call = UcxCall::enter();
            // SAFETY: the worker is live and destroyed once; callbacks it
            // still runs find `shared` alive, as it is freed only below.
            unsafe { ucp_worker_destroy(self.worker) };
        }
        for ctx in self.shared().in_flight_sends.take() {
            // SAFETY: a SendCtx from Box::into_raw in `send` whose request
            // never completed; with the worker destroyed, no callback or
            // UCX access can reach it any more.
            drop(unsafe { Box::from_raw(ctx as *mut SendCtx) });
        }
        for ctx in self.shared().in_flight_receives.take() {
            // SAFETY: likewise, a RecvCtx from `on_frame`.
            drop(unsafe { Box::from_raw(ctx as *mut RecvCtx) });
        }
        // SAFETY: from Box::into_raw in `with_config`; UCX holds no pointer
        // to it any more now that the worker is gone.
        drop(unsafe { Box::from_raw(self.shared as *mut Shared) });
        let _setup = GLOBAL_SETUP.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the context's only worker was destroyed above.
        unsafe { ucp_cleanup(self.context) };
    }
}

/// UCX 1.13's TCP transport aborts the whole process (a failed assertion,
/// not an error) when a peer goes away while a zero-copy or rendezvous
/// send to it is under way: `tcp_ep.c` "PUT_TX_WAITING_ACK" for a
/// rendezvous PUT, `uct_iface.h` "comp->count > 0" for a zero-copy active
/// message. A daemon must outlive its peers, so where TCP is the only
/// network transport (no RDMA device on the machine) every frame is sent
/// by copy: `ZCOPY_THRESH` and `RNDV_THRESH` become `inf`, unless the
/// environment names them itself. With an RDMA device the defaults stay,
/// zero copy being the point of RDMA.
fn copying_defaults(rdma: bool, in_environment: impl Fn(&str) -> bool) -> Vec<(&'static str, &'static str)> {
    if rdma {
        return Vec::new();
    }
    ["ZCOPY_THRESH", "RNDV_THRESH"].into_iter().filter(|name| !in_environment(name)).map(|name| (name, "inf")).collect()
}

/// Whether the kernel knows an RDMA device (InfiniBand, RoCE, iWARP).
fn rdma_devices_present() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

fn create_context(config: &Config) -> io::Result<ucp_context_h> {
    let mut ucp_config = ptr::null_mut();
    // SAFETY: NULL prefix and file mean "UCX_" and no file; the out-pointer
    // is valid.
    check(unsafe { ucp_config_read(ptr::null(), ptr::null(), &mut ucp_config) })?;
    let mut result = Ok(());
    let rdma = rdma_devices_present();
    let defaults = copying_defaults(rdma, |name| std::env::var_os(format!("UCX_{name}")).is_some());
    let defaults: Vec<(CString, CString)> =
        defaults.iter().map(|(n, v)| (CString::new(*n).expect("no NUL"), CString::new(*v).expect("no NUL"))).collect();
    for (name, value) in defaults.iter().chain(&config.settings) {
        // SAFETY: `ucp_config` is live; both strings are NUL-terminated and
        // outlive the call (UCX copies the value).
        let status = unsafe { ucp_config_modify(ucp_config, name.as_ptr(), value.as_ptr()) };
        if status != UCS_OK {
            result = Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "UCX rejected UCX_{}={}: {}",
                    name.to_string_lossy(),
                    value.to_string_lossy(),
                    UcxError { status }
                ),
            ));
            break;
        }
    }
    let mut context = ptr::null_mut();
    if result.is_ok() {
        let params = ucp_params_t {
            field_mask: UCP_PARAM_FIELD_FEATURES,
            features: UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
            request_size: 0,
            request_init: None,
            request_cleanup: None,
            tag_sender_mask: 0,
            mt_workers_shared: 0,
            estimated_num_eps: 0,
            estimated_num_ppn: 0,
            name: ptr::null(),
        };
        // The API version is the one sys.rs's declarations were checked against.
        // SAFETY: `params` is valid with a field_mask naming only `features`;
        // `ucp_config` is live; the out-pointer is valid.
        let status = unsafe { ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, ucp_config, &mut context) };
        result = check(status);
    }
    // SAFETY: read above, released once; ucp_init does not keep it.
    unsafe { ucp_config_release(ucp_config) };
    result.map(|()| context)
}

/// Sleeps until `fd` is readable or `max` passes.
fn wait_readable(fd: RawFd, max: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = max.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd, matching the count of 1.
    if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// An IPv4 or IPv6 socket address laid out for the kernel and UCX.
#[repr(C)]
union SockAddrIn {
    v4: sockaddr_in,
    v6: sockaddr_in6,
}

struct RawSockAddr {
    addr: SockAddrIn,
    len: socklen_t,
}

impl RawSockAddr {
    fn new(addr: SocketAddr) -> RawSockAddr {
        match addr {
            SocketAddr::V4(a) => RawSockAddr {
                addr: SockAddrIn {
                    v4: sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: a.port().to_be(),
                        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                        sin_zero: [0; 8],
                    },
                },
                len: std::mem::size_of::<sockaddr_in>() as socklen_t,
            },
            SocketAddr::V6(a) => RawSockAddr {
                addr: SockAddrIn {
                    v6: sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: a.port().to_be(),
                        sin6_flowinfo: a.flowinfo(),
                        sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                        sin6_scope_id: a.scope_id(),
                    },
                },
                len: std::mem::size_of::<sockaddr_in6>() as socklen_t,
            },
        }
    }

    /// Borrows the address for one UCX call.
    fn as_ucs(&self) -> ucs_sock_addr_t {
        ucs_sock_addr_t { addr: (&self.addr as *const SockAddrIn).cast::<sockaddr>(), addrlen: self.len }
    }
}

fn zeroed_storage() -> sockaddr_storage {
    // SAFETY: sockaddr_storage is plain integers, for which zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Reads an AF_INET or AF_INET6 address out of a sockaddr_storage.
fn socket_addr(storage: &sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which
            // is smaller than and no more aligned than sockaddr_storage.
            let sin = unsafe { &*(storage as *const sockaddr_storage).cast::<sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const sockaddr_storage).cast::<sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id)))
        }
        _ => None,
    }
}

/// `ucp_listener_conn_callback_t`: queues the request for `accept_pending`,
/// which creates the endpoint outside the callback.
unsafe extern "C" fn on_conn_request(request: ucp_conn_request_h, arg: *mut c_void) {
    assert_in_ucx_call();
    // SAFETY: `arg` is the worker's Shared (see `listen`), alive while the
    // listener is; only shared references to it exist.
    let shared = unsafe { &*(arg as *const Shared) };
    shared.conn_requests.borrow_mut().push_back(request);
}

/// `ucp_err_handler_cb_t`: the endpoint's peer failed or the link broke.
unsafe extern "C" fn on_ep_error(arg: *mut c_void, handle: ucp_ep_h, status: ucs_status_t) {
    assert_in_ucx_call();
    // SAFETY: `arg` is the worker's Shared (see `ep_params`), alive while
    // the worker is.
    let shared = unsafe { &*(arg as *const Shared) };
    if let Some(ep) = shared.lookup(handle) {
        shared.fail(ep, ucx_error(status));
    }
}

/// `ucp_am_recv_callback_t` for [`FRAME_AM_ID`].
unsafe extern "C" fn on_frame(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const ucp_am_recv_param_t,
) -> ucs_status_t {
    assert_in_ucx_call();
    // SAFETY: `arg` is the worker's Shared (see `with_config`), alive while
    // the worker is.
    let shared = unsafe { &*(arg as *const Shared) };
    // SAFETY: UCX passes a valid parameter struct for the callback's span.
    let param = unsafe { &*param };
    let rendezvous = param.recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV != 0;
    // Returned for a rendezvous message that is not wanted: UCX drops it and
    // fails the sender's request with this status.
    let refuse = if rendezvous { UCS_ERR_INVALID_PARAM } else { UCS_OK };
    if header_length != HEADER_LEN || header.is_null() {
        return refuse;
    }
    let mut seq = [0u8; HEADER_LEN];
    // SAFETY: UCX guarantees `header_length` readable bytes at `header` for
    // the callback's span; `seq` has room for exactly that many.
    unsafe { ptr::copy_nonoverlapping(header.cast::<u8>(), seq.as_mut_ptr(), HEADER_LEN) };
    let seq = u64::from_le_bytes(seq);
    if param.recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP == 0 {
        return refuse;
    }
    let Some(ep) = shared.lookup(param.reply_ep) else {
        return refuse;
    };
    if length > MAX_FRAME_LEN {
        shared.fail(ep, io::Error::new(io::ErrorKind::InvalidData, "peer sent a frame larger than MAX_FRAME_LEN"));
        return refuse;
    }
    if !rendezvous {
        let frame = if length == 0 {
            Vec::new()
        } else {
            // SAFETY: without FLAG_RNDV, `data` holds `length` readable bytes
            // for the callback's span (with or without FLAG_DATA); they are
            // copied out before returning UCS_OK, which lets UCX reuse them.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) }.to_vec()
        };
        shared.deliver(ep, seq, frame);
        return UCS_OK;
    }
    if !shared.announce(ep, seq) {
        return refuse;
    }
    let ctx = Box::into_raw(Box::new(RecvCtx { shared: arg as *const Shared, ep, seq, buf: vec![0; length] }));
    shared.in_flight_receives.borrow_mut().insert(ctx as usize);
    let callback = ucp_request_param_cb { recv_am: Some(on_rendezvous_done) };
    let params = ucp_request_param_t::with_callback(callback, ctx.cast(), 0, true);
    // `on_rendezvous_done` frees `*ctx` if a request is returned, otherwise
    // it is freed below; UCX owns `data` afterwards, even on error.
    // SAFETY: `data` is the rendezvous descriptor UCX just passed, used once;
    // the buffer is `length` writable bytes inside `*ctx`, which stays put
    // until the receive completes.
    let result = unsafe { ucp_am_recv_data_nbx(shared.worker, data, (*ctx).buf.as_mut_ptr().cast(), length, &params) };
    match status_ptr(result) {
        StatusPtr::Request => {}
        StatusPtr::Done => {
            shared.in_flight_receives.borrow_mut().remove(&(ctx as usize));
            // SAFETY: no request, no callback: `ctx` is still ours alone.
            let ctx = unsafe { Box::from_raw(ctx) };
            shared.deliver(ep, seq, ctx.buf);
        }
        StatusPtr::Error(status) => {
            shared.in_flight_receives.borrow_mut().remove(&(ctx as usize));
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(ctx) });
            shared.fail(ep, ucx_error(status));
        }
    }
    UCS_OK
}

/// `ucp_am_recv_data_nbx_callback_t`: a rendezvous frame's data arrived.
unsafe extern "C" fn on_rendezvous_done(
    request: *mut c_void,
    status: ucs_status_t,
    length: usize,
    user_data: *mut c_void,
) {
    assert_in_ucx_call();
    // SAFETY: `user_data` is the RecvCtx from `on_frame`, whose ownership
    // passed to this callback when a request was returned; it runs once.
    let ctx = unsafe { Box::from_raw(user_data.cast::<RecvCtx>()) };
    // SAFETY: the request is complete and freed once; freeing it inside its
    // own callback is allowed (UCX returns it to its pool afterwards).
    unsafe { ucp_request_free(request) };
    // SAFETY: the Shared outlives every request of its worker.
    let shared = unsafe { &*ctx.shared };
    shared.in_flight_receives.borrow_mut().remove(&(user_data as usize));
    let RecvCtx { ep, seq, mut buf, .. } = *ctx;
    if status == UCS_OK {
        buf.truncate(length);
        shared.deliver(ep, seq, buf);
    } else {
        shared.fail(ep, ucx_error(status));
    }
}

/// `ucp_send_nbx_callback_t` for frames.
unsafe extern "C" fn on_send_done(request: *mut c_void, status: ucs_status_t, user_data: *mut c_void) {
    assert_in_ucx_call();
    // SAFETY: `user_data` is the SendCtx from `send`, owned by this callback
    // once a request was returned; it runs once.
    let ctx = unsafe { Box::from_raw(user_data.cast::<SendCtx>()) };
    // SAFETY: as in `on_rendezvous_done`.
    unsafe { ucp_request_free(request) };
    // SAFETY: the Shared outlives every request of its worker.
    let shared = unsafe { &*ctx.shared };
    shared.in_flight_sends.borrow_mut().remove(&(user_data as usize));
    if let Some(endpoint) = shared.endpoints.borrow_mut().get_mut(&ctx.ep) {
        endpoint.sending -= ctx.data.len();
    }
    if status != UCS_OK {
        shared.fail(ctx.ep, ucx_error(status));
    }
    shared.recycle(ctx.data);
}

/// `ucp_send_nbx_callback_t` for `ucp_ep_close_nbx` and `ucp_ep_flush_nbx`.
unsafe extern "C" fn on_request_done(request: *mut c_void, status: ucs_status_t, user_data: *mut c_void) {
    assert_in_ucx_call();
    // SAFETY: `user_data` came from Rc::into_raw in `wait_for`, owned by this
    // callback once a request was returned; it runs once.
    let done = unsafe { Rc::from_raw(user_data as *const Cell<Option<ucs_status_t>>) };
    done.set(Some(status));
    // SAFETY: as in `on_rendezvous_done`.
    unsafe { ucp_request_free(request) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_the_c_layout() {
        for text in ["127.0.0.1:4791", "[::1]:80", "[fe80::1%3]:9"] {
            let addr: SocketAddr = text.parse().unwrap();
            let raw = RawSockAddr::new(addr);
            let mut storage = zeroed_storage();
            // SAFETY: the first `raw.len` bytes of `raw.addr` are initialised
            // (the union member of that size) and fit in the storage.
            unsafe {
                ptr::copy_nonoverlapping(
                    (&raw.addr as *const SockAddrIn).cast::<u8>(),
                    (&mut storage as *mut sockaddr_storage).cast::<u8>(),
                    raw.len as usize,
                )
            };
            assert_eq!(socket_addr(&storage), Some(addr));
        }
    }

    #[test]
    fn errors_name_the_ucx_status() {
        let e = ucx_error(UCS_ERR_CONNECTION_RESET);
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(e.to_string().contains("-25"), "{e}");
    }

    #[test]
    fn without_rdma_frames_are_copied_unless_the_environment_says_otherwise() {
        let none = |_: &str| false;
        assert_eq!(copying_defaults(false, none), [("ZCOPY_THRESH", "inf"), ("RNDV_THRESH", "inf")]);
        assert_eq!(copying_defaults(false, |n: &str| n == "RNDV_THRESH"), [("ZCOPY_THRESH", "inf")]);
        assert!(copying_defaults(true, none).is_empty());
    }
}
