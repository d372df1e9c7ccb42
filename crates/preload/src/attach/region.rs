//! A VM guest's side of its region: where the region is, mapping a
//! connection's piece of it, and the connection's bell stream.
//!
//! The region is the VM's ivshmem device (PCI vendor 0x1af4, device
//! 0x1110), which the guest kernel exposes as
//! `/sys/bus/pci/devices/<address>/resource2`: mapping it needs no guest
//! kernel module. `VSOCKET_REGION` names the file where the VM has more
//! than one such device. Each connection's bell stream goes to the host's
//! [`BELL_PORT`] and names the connection and this end of it in its first
//! 9 bytes; after that
//! it is the connection's doorbell, as a namespace guest's socket pair is
//! (a byte a wake-up, its end the peer gone).

use super::{Control, Delivery, Given};
use crate::sys::{self, Errno, SysResult};
use std::ffi::CString;
use std::sync::OnceLock;
use vsocket_abi::control::ConnectionInfo;
use vsocket_abi::layout::Endpoint;
use vsocket_abi::stream::BELL_PORT;
use vsocket_ring::Segment;

/// The ivshmem device's PCI ids, as sysfs writes them.
const VENDOR: &str = "0x1af4";
const DEVICE: &str = "0x1110";

/// The region's device file, found once.
fn region_path() -> Option<&'static CString> {
    static PATH: OnceLock<Option<CString>> = OnceLock::new();
    PATH.get_or_init(|| {
        use std::os::unix::ffi::OsStringExt;
        if let Some(path) = std::env::var_os("VSOCKET_REGION").filter(|p| !p.is_empty()) {
            return CString::new(path.into_vec()).ok();
        }
        let devices = std::fs::read_dir("/sys/bus/pci/devices").ok()?;
        let mut found: Vec<std::path::PathBuf> = devices
            .flatten()
            .map(|d| d.path())
            .filter(|dev| {
                let id = |name: &str| std::fs::read_to_string(dev.join(name)).unwrap_or_default();
                id("vendor").trim() == VENDOR && id("device").trim() == DEVICE
            })
            .collect();
        found.sort();
        CString::new(found.first()?.join("resource2").into_os_string().into_vec()).ok()
    })
    .as_ref()
}

/// Maps end `end` of connection `info`, placed at `offset` of the region.
pub fn map(offset: u64, info: &ConnectionInfo, end: Endpoint) -> SysResult<Segment> {
    let path = region_path().ok_or(Errno(libc::ENODEV))?;
    let fd = sys::open_rw(path)?;
    // The mapping outlives the descriptor: no descriptor is kept.
    let mapped = sys::with_borrowed(fd, |region| Segment::map_placed(region, offset, info.ring_size, end));
    let _ = sys::close(fd);
    let segment = mapped.map_err(|_| Errno(libc::EPROTO))?;
    // A piece names its connection: one that names another was given back
    // and placed again before this end came to map it (its connection was
    // reset meanwhile). A daemon older than the naming leaves it 0.
    if (0..2).any(|half| ![info.id, 0].contains(&segment.connection_id(half))) {
        return Err(Errno(libc::ECONNRESET));
    }
    Ok(segment)
}

/// What comes with a `ConnectedAt` or `IncomingAt` for end `end` of
/// connection `id`, placed at `offset`: opens its bell stream.
pub fn delivery(id: u64, end: Endpoint, offset: u64) -> SysResult<Delivery> {
    let Some(Control::Vsock { cid, .. }) = super::control() else {
        return Err(Errno(libc::EPROTO));
    };
    let bell = sys::connect_vsock(*cid, BELL_PORT)?;
    let mut name = [0u8; 9];
    name[..8].copy_from_slice(&id.to_le_bytes());
    name[8] = end.index() as u8;
    let named = sys::send_all(bell, &name)
        .and_then(|()| sys::fcntl(bell, libc::F_SETFL, libc::O_NONBLOCK as libc::c_long).map(drop));
    if let Err(e) = named {
        let _ = sys::close(bell);
        return Err(e);
    }
    let mut fds = [bell];
    sys::relocate_internal(&mut fds, super::seqpacket::internal_fd_floor());
    Ok(Delivery::of(Given::Placed(offset), fds[0], None))
}
