//! Raw declarations of the part of UCX 1.13's UCP API this crate calls,
//! written by hand from `<ucp/api/ucp.h>`, `<ucp/api/ucp_def.h>` and
//! `<ucs/type/status.h>`. No logic lives here.
//!
//! Every struct size, alignment, field offset and constant below is checked
//! at compile time against the installed headers (see `build.rs`); the
//! generated assertions are included at the end of this file.
//!
//! Every parameter struct starts with a `field_mask`: UCX reads only the
//! fields whose bit is set, so the structs are zero-initialised and only the
//! fields a caller sets are announced.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_uint, c_ulong, c_void, sockaddr, sockaddr_storage, socklen_t};
use std::marker::{PhantomData, PhantomPinned};

/// `ucs_status_t`: the headers declare it `UCS_S_PACKED`, so it is one byte.
pub type ucs_status_t = i8;
/// `ucs_status_ptr_t`: a request pointer, NULL (done), or a status in the
/// top 100 addresses.
pub type ucs_status_ptr_t = *mut c_void;

pub const UCS_OK: ucs_status_t = 0;
pub const UCS_INPROGRESS: ucs_status_t = 1;
pub const UCS_ERR_NO_MESSAGE: ucs_status_t = -1;
pub const UCS_ERR_NO_RESOURCE: ucs_status_t = -2;
pub const UCS_ERR_IO_ERROR: ucs_status_t = -3;
pub const UCS_ERR_NO_MEMORY: ucs_status_t = -4;
pub const UCS_ERR_INVALID_PARAM: ucs_status_t = -5;
pub const UCS_ERR_UNREACHABLE: ucs_status_t = -6;
pub const UCS_ERR_INVALID_ADDR: ucs_status_t = -7;
pub const UCS_ERR_NOT_IMPLEMENTED: ucs_status_t = -8;
pub const UCS_ERR_MESSAGE_TRUNCATED: ucs_status_t = -9;
pub const UCS_ERR_NO_DEVICE: ucs_status_t = -14;
pub const UCS_ERR_BUSY: ucs_status_t = -15;
pub const UCS_ERR_CANCELED: ucs_status_t = -16;
pub const UCS_ERR_ALREADY_EXISTS: ucs_status_t = -18;
pub const UCS_ERR_TIMED_OUT: ucs_status_t = -20;
pub const UCS_ERR_UNSUPPORTED: ucs_status_t = -22;
pub const UCS_ERR_REJECTED: ucs_status_t = -23;
pub const UCS_ERR_NOT_CONNECTED: ucs_status_t = -24;
pub const UCS_ERR_CONNECTION_RESET: ucs_status_t = -25;
pub const UCS_ERR_FIRST_LINK_FAILURE: ucs_status_t = -40;
pub const UCS_ERR_LAST_LINK_FAILURE: ucs_status_t = -59;
pub const UCS_ERR_FIRST_ENDPOINT_FAILURE: ucs_status_t = -60;
pub const UCS_ERR_ENDPOINT_TIMEOUT: ucs_status_t = -80;
pub const UCS_ERR_LAST_ENDPOINT_FAILURE: ucs_status_t = -89;
pub const UCS_ERR_LAST: ucs_status_t = -100;

/// What `UCS_PTR_IS_ERR`, `UCS_PTR_IS_PTR` and `UCS_PTR_STATUS` tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPtr {
    /// NULL: the operation completed at once; no callback will run.
    Done,
    /// The operation failed at once; no callback will run.
    Error(ucs_status_t),
    /// A request: its callback runs (or already ran) exactly once.
    Request,
}

/// Classifies a `ucs_status_ptr_t` exactly as the header's macros do.
pub fn status_ptr(ptr: ucs_status_ptr_t) -> StatusPtr {
    let raw = ptr as usize;
    if raw == 0 {
        StatusPtr::Done
    } else if raw >= UCS_ERR_LAST as isize as usize {
        // The pointer carries a status in [-100, -1] sign-extended.
        StatusPtr::Error(raw as isize as ucs_status_t)
    } else {
        StatusPtr::Request
    }
}

macro_rules! opaque {
    ($($name:ident),*) => {$(
        #[repr(C)]
        pub struct $name {
            _data: [u8; 0],
            _marker: PhantomData<(*mut u8, PhantomPinned)>,
        }
    )*};
}
opaque!(ucp_context, ucp_worker, ucp_ep, ucp_listener, ucp_conn_request, ucp_address, ucp_mem);

pub type ucp_context_h = *mut ucp_context;
pub type ucp_worker_h = *mut ucp_worker;
pub type ucp_ep_h = *mut ucp_ep;
pub type ucp_listener_h = *mut ucp_listener;
pub type ucp_conn_request_h = *mut ucp_conn_request;
pub type ucp_mem_h = *mut ucp_mem;
pub type ucp_datatype_t = u64;

/// `ucs_thread_mode_t`, a C enum.
pub type ucs_thread_mode_t = c_uint;
pub const UCS_THREAD_MODE_SERIALIZED: ucs_thread_mode_t = 1;
/// `ucp_err_handling_mode_t`, a C enum.
pub type ucp_err_handling_mode_t = c_uint;
pub const UCP_ERR_HANDLING_MODE_PEER: ucp_err_handling_mode_t = 1;
/// `ucs_memory_type_t`, a C enum.
pub type ucs_memory_type_t = c_uint;

pub const UCP_API_MAJOR: c_uint = 1;
pub const UCP_API_MINOR: c_uint = 13;

pub const UCP_PARAM_FIELD_FEATURES: u64 = 1 << 0;
pub const UCP_PARAM_FIELD_NAME: u64 = 1 << 8;
pub const UCP_FEATURE_WAKEUP: u64 = 1 << 4;
pub const UCP_FEATURE_AM: u64 = 1 << 6;

pub const UCP_WORKER_PARAM_FIELD_THREAD_MODE: u64 = 1 << 0;
pub const UCP_WORKER_PARAM_FIELD_FLAGS: u64 = 1 << 5;
pub const UCP_WORKER_PARAM_FIELD_NAME: u64 = 1 << 6;
pub const UCP_WORKER_FLAG_IGNORE_REQUEST_LEAK: u64 = 1 << 0;

pub const UCP_LISTENER_PARAM_FIELD_SOCK_ADDR: u64 = 1 << 0;
pub const UCP_LISTENER_PARAM_FIELD_CONN_HANDLER: u64 = 1 << 2;
pub const UCP_LISTENER_ATTR_FIELD_SOCKADDR: u64 = 1 << 0;
pub const UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR: u64 = 1 << 0;

pub const UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE: u64 = 1 << 1;
pub const UCP_EP_PARAM_FIELD_ERR_HANDLER: u64 = 1 << 2;
pub const UCP_EP_PARAM_FIELD_SOCK_ADDR: u64 = 1 << 4;
pub const UCP_EP_PARAM_FIELD_FLAGS: u64 = 1 << 5;
pub const UCP_EP_PARAM_FIELD_CONN_REQUEST: u64 = 1 << 6;
pub const UCP_EP_PARAMS_FLAGS_CLIENT_SERVER: c_uint = 1 << 0;
pub const UCP_EP_CLOSE_FLAG_FORCE: u32 = 1 << 0;

pub const UCP_OP_ATTR_FIELD_CALLBACK: u32 = 1 << 1;
pub const UCP_OP_ATTR_FIELD_USER_DATA: u32 = 1 << 2;
pub const UCP_OP_ATTR_FIELD_DATATYPE: u32 = 1 << 3;
pub const UCP_OP_ATTR_FIELD_FLAGS: u32 = 1 << 4;

pub const UCP_AM_FLAG_WHOLE_MSG: u32 = 1 << 0;
pub const UCP_AM_SEND_FLAG_REPLY: u32 = 1 << 0;
pub const UCP_AM_RECV_ATTR_FIELD_REPLY_EP: u64 = 1 << 0;
pub const UCP_AM_RECV_ATTR_FLAG_DATA: u64 = 1 << 16;
pub const UCP_AM_RECV_ATTR_FLAG_RNDV: u64 = 1 << 17;

pub const UCP_AM_HANDLER_PARAM_FIELD_ID: u64 = 1 << 0;
pub const UCP_AM_HANDLER_PARAM_FIELD_FLAGS: u64 = 1 << 1;
pub const UCP_AM_HANDLER_PARAM_FIELD_CB: u64 = 1 << 2;
pub const UCP_AM_HANDLER_PARAM_FIELD_ARG: u64 = 1 << 3;

pub const UCP_DATATYPE_CONTIG: u64 = 0;
pub const UCP_DATATYPE_SHIFT: u64 = 3;
/// `ucp_dt_make_contig(1)`: counts are in bytes.
pub const UCP_DATATYPE_BYTES: ucp_datatype_t = (1 << UCP_DATATYPE_SHIFT) | UCP_DATATYPE_CONTIG;

pub type ucp_request_init_callback_t = Option<unsafe extern "C" fn(request: *mut c_void)>;
pub type ucp_request_cleanup_callback_t = Option<unsafe extern "C" fn(request: *mut c_void)>;
pub type ucp_err_handler_cb_t = Option<unsafe extern "C" fn(arg: *mut c_void, ep: ucp_ep_h, status: ucs_status_t)>;
pub type ucp_listener_accept_callback_t = Option<unsafe extern "C" fn(ep: ucp_ep_h, arg: *mut c_void)>;
pub type ucp_listener_conn_callback_t =
    Option<unsafe extern "C" fn(conn_request: ucp_conn_request_h, arg: *mut c_void)>;
pub type ucp_send_nbx_callback_t =
    Option<unsafe extern "C" fn(request: *mut c_void, status: ucs_status_t, user_data: *mut c_void)>;
pub type ucp_am_recv_data_nbx_callback_t =
    Option<unsafe extern "C" fn(request: *mut c_void, status: ucs_status_t, length: usize, user_data: *mut c_void)>;
pub type ucp_am_recv_callback_t = Option<
    unsafe extern "C" fn(
        arg: *mut c_void,
        header: *const c_void,
        header_length: usize,
        data: *mut c_void,
        length: usize,
        param: *const ucp_am_recv_param_t,
    ) -> ucs_status_t,
>;

#[repr(C)]
pub struct ucs_cpu_set_t {
    pub ucs_bits: [c_ulong; 1024 / (8 * std::mem::size_of::<c_ulong>())],
}

#[repr(C)]
pub struct ucs_sock_addr_t {
    pub addr: *const sockaddr,
    pub addrlen: socklen_t,
}

#[repr(C)]
pub struct ucp_params_t {
    pub field_mask: u64,
    pub features: u64,
    pub request_size: usize,
    pub request_init: ucp_request_init_callback_t,
    pub request_cleanup: ucp_request_cleanup_callback_t,
    pub tag_sender_mask: u64,
    pub mt_workers_shared: c_int,
    pub estimated_num_eps: usize,
    pub estimated_num_ppn: usize,
    pub name: *const c_char,
}

#[repr(C)]
pub struct ucp_worker_params_t {
    pub field_mask: u64,
    pub thread_mode: ucs_thread_mode_t,
    pub cpu_mask: ucs_cpu_set_t,
    pub events: c_uint,
    pub user_data: *mut c_void,
    pub event_fd: c_int,
    pub flags: u64,
    pub name: *const c_char,
    pub am_alignment: usize,
    pub client_id: u64,
}

#[repr(C)]
pub struct ucp_err_handler_t {
    pub cb: ucp_err_handler_cb_t,
    pub arg: *mut c_void,
}

#[repr(C)]
pub struct ucp_ep_params_t {
    pub field_mask: u64,
    pub address: *const ucp_address,
    pub err_mode: ucp_err_handling_mode_t,
    pub err_handler: ucp_err_handler_t,
    pub user_data: *mut c_void,
    pub flags: c_uint,
    pub sockaddr: ucs_sock_addr_t,
    pub conn_request: ucp_conn_request_h,
    pub name: *const c_char,
    pub local_sockaddr: ucs_sock_addr_t,
}

#[repr(C)]
pub struct ucp_listener_accept_handler_t {
    pub cb: ucp_listener_accept_callback_t,
    pub arg: *mut c_void,
}

#[repr(C)]
pub struct ucp_listener_conn_handler_t {
    pub cb: ucp_listener_conn_callback_t,
    pub arg: *mut c_void,
}

#[repr(C)]
pub struct ucp_listener_params_t {
    pub field_mask: u64,
    pub sockaddr: ucs_sock_addr_t,
    pub accept_handler: ucp_listener_accept_handler_t,
    pub conn_handler: ucp_listener_conn_handler_t,
}

#[repr(C)]
pub struct ucp_listener_attr_t {
    pub field_mask: u64,
    pub sockaddr: sockaddr_storage,
}

#[repr(C)]
pub struct ucp_conn_request_attr_t {
    pub field_mask: u64,
    pub client_address: sockaddr_storage,
    pub client_id: u64,
}

/// The anonymous `cb` union of `ucp_request_param_t`; this crate uses two
/// of its four members (all are function pointers).
#[repr(C)]
#[derive(Clone, Copy)]
pub union ucp_request_param_cb {
    pub send: ucp_send_nbx_callback_t,
    pub recv_am: ucp_am_recv_data_nbx_callback_t,
}

#[repr(C)]
pub struct ucp_request_param_t {
    pub op_attr_mask: u32,
    pub flags: u32,
    pub request: *mut c_void,
    pub cb: ucp_request_param_cb,
    pub datatype: ucp_datatype_t,
    pub user_data: *mut c_void,
    pub reply_buffer: *mut c_void,
    pub memory_type: ucs_memory_type_t,
    /// A union of two pointers in C (`size_t *length`,
    /// `ucp_tag_recv_info_t *tag_info`); unused here.
    pub recv_info: *mut c_void,
    pub memh: ucp_mem_h,
}

impl ucp_request_param_t {
    /// Parameters with a completion callback `cb` and its `user_data`,
    /// `flags` (if any) and, if `bytes`, a contiguous byte buffer as the
    /// datatype; each field set is named in `op_attr_mask`, the rest are
    /// null.
    pub fn with_callback(cb: ucp_request_param_cb, user_data: *mut c_void, flags: u32, bytes: bool) -> Self {
        let mut mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
        if flags != 0 {
            mask |= UCP_OP_ATTR_FIELD_FLAGS;
        }
        if bytes {
            mask |= UCP_OP_ATTR_FIELD_DATATYPE;
        }
        ucp_request_param_t {
            op_attr_mask: mask,
            flags,
            request: std::ptr::null_mut(),
            cb,
            datatype: if bytes { UCP_DATATYPE_BYTES } else { 0 },
            user_data,
            reply_buffer: std::ptr::null_mut(),
            memory_type: 0,
            recv_info: std::ptr::null_mut(),
            memh: std::ptr::null_mut(),
        }
    }
}

#[repr(C)]
pub struct ucp_am_handler_param_t {
    pub field_mask: u64,
    pub id: c_uint,
    pub flags: u32,
    pub cb: ucp_am_recv_callback_t,
    pub arg: *mut c_void,
}

#[repr(C)]
pub struct ucp_am_recv_param_t {
    pub recv_attr: u64,
    pub reply_ep: ucp_ep_h,
}

#[link(name = "ucp")]
extern "C" {
    pub fn ucp_init_version(
        api_major_version: c_uint,
        api_minor_version: c_uint,
        params: *const ucp_params_t,
        config: *const c_void,
        context_p: *mut ucp_context_h,
    ) -> ucs_status_t;
    pub fn ucp_cleanup(context: ucp_context_h);
    pub fn ucp_config_read(
        env_prefix: *const c_char,
        filename: *const c_char,
        config_p: *mut *mut c_void,
    ) -> ucs_status_t;
    pub fn ucp_config_modify(config: *mut c_void, name: *const c_char, value: *const c_char) -> ucs_status_t;
    pub fn ucp_config_release(config: *mut c_void);

    pub fn ucp_worker_create(
        context: ucp_context_h,
        params: *const ucp_worker_params_t,
        worker_p: *mut ucp_worker_h,
    ) -> ucs_status_t;
    pub fn ucp_worker_destroy(worker: ucp_worker_h);
    pub fn ucp_worker_progress(worker: ucp_worker_h) -> c_uint;
    pub fn ucp_worker_get_efd(worker: ucp_worker_h, fd: *mut c_int) -> ucs_status_t;
    pub fn ucp_worker_arm(worker: ucp_worker_h) -> ucs_status_t;
    pub fn ucp_worker_set_am_recv_handler(worker: ucp_worker_h, param: *const ucp_am_handler_param_t) -> ucs_status_t;

    pub fn ucp_listener_create(
        worker: ucp_worker_h,
        params: *const ucp_listener_params_t,
        listener_p: *mut ucp_listener_h,
    ) -> ucs_status_t;
    pub fn ucp_listener_destroy(listener: ucp_listener_h);
    pub fn ucp_listener_query(listener: ucp_listener_h, attr: *mut ucp_listener_attr_t) -> ucs_status_t;
    pub fn ucp_listener_reject(listener: ucp_listener_h, conn_request: ucp_conn_request_h) -> ucs_status_t;
    pub fn ucp_conn_request_query(conn_request: ucp_conn_request_h, attr: *mut ucp_conn_request_attr_t)
        -> ucs_status_t;

    pub fn ucp_ep_create(worker: ucp_worker_h, params: *const ucp_ep_params_t, ep_p: *mut ucp_ep_h) -> ucs_status_t;
    pub fn ucp_ep_close_nbx(ep: ucp_ep_h, param: *const ucp_request_param_t) -> ucs_status_ptr_t;
    pub fn ucp_ep_flush_nbx(ep: ucp_ep_h, param: *const ucp_request_param_t) -> ucs_status_ptr_t;

    pub fn ucp_am_send_nbx(
        ep: ucp_ep_h,
        id: c_uint,
        header: *const c_void,
        header_length: usize,
        buffer: *const c_void,
        count: usize,
        param: *const ucp_request_param_t,
    ) -> ucs_status_ptr_t;
    pub fn ucp_am_recv_data_nbx(
        worker: ucp_worker_h,
        data_desc: *mut c_void,
        buffer: *mut c_void,
        count: usize,
        param: *const ucp_request_param_t,
    ) -> ucs_status_ptr_t;

    pub fn ucp_request_free(request: *mut c_void);
}

#[link(name = "ucs")]
extern "C" {
    pub fn ucs_status_string(status: ucs_status_t) -> *const c_char;
}

// Compile-time checks against the installed headers, generated by build.rs.
include!(concat!(env!("OUT_DIR"), "/layout_checks.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ptr_matches_the_header_macros() {
        assert_eq!(status_ptr(std::ptr::null_mut()), StatusPtr::Done);
        for status in UCS_ERR_LAST..0 {
            let ptr = status as isize as usize as ucs_status_ptr_t;
            assert_eq!(status_ptr(ptr), StatusPtr::Error(status));
        }
        let mut request = 0u64;
        assert_eq!(status_ptr((&mut request as *mut u64).cast()), StatusPtr::Request);
    }
}
