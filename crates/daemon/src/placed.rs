//! A VM guest's connection memory: the region file the VM maps whole (its
//! ivshmem device), pieces of it placed for connections, and the daemon's
//! end of such a connection ([`RegionEnd`]).
//!
//! The VM can write every byte of its region, so a piece is never shared
//! with another guest: the daemon is the VM's only peer on it, and the
//! bridge (or the fabric relay) copies between it and the other end. A
//! piece goes back to the region when the daemon's end is dropped.

use crate::fabric::local::{Rings, SegmentEnd};
use crate::region::{CarveError, Piece, Region};
use crate::sync::lock;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use vsocket_abi::layout::segment_size;
use vsocket_ring::Segment;

/// One VM's region: its file and which pieces are in use.
#[derive(Debug)]
pub struct VmMemory {
    file: File,
    region: Mutex<Region>,
}

/// Why a connection could not be placed.
#[derive(Debug)]
pub enum PlaceError {
    /// The region has no room: {0}
    Full(CarveError),
    /// The piece could not be mapped: {0}
    Map(io::Error),
}

impl std::fmt::Display for PlaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlaceError::Full(e) => write!(f, "the VM's region has no room: {e}"),
            PlaceError::Map(e) => write!(f, "a piece of the VM's region cannot be mapped: {e}"),
        }
    }
}

impl VmMemory {
    /// Makes the region file at `path`, `size` bytes of zeros. A file made
    /// before is unlinked, not truncated: a QEMU that still maps it (its
    /// VM started against an earlier daemon) keeps its pages rather than
    /// faulting on a shrunk file.
    pub fn create(path: &Path, size: u64) -> io::Result<VmMemory> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        file.set_len(size)?;
        Ok(VmMemory { file, region: Mutex::new(Region::new(size)) })
    }

    /// Places a connection with rings of `ring_size` bytes in a free piece.
    pub fn place(self: &Arc<Self>, ring_size: u32) -> Result<Placed, PlaceError> {
        let piece = lock(&self.region).carve(segment_size(ring_size) as u64).map_err(PlaceError::Full)?;
        match Segment::place(self.file.as_fd(), piece.offset, ring_size) {
            Ok(segment) => Ok(Placed { vm: self.clone(), piece, segment }),
            Err(e) => {
                lock(&self.region).give_back(piece);
                Err(PlaceError::Map(e))
            }
        }
    }

    /// Bytes in use by connections, and the region's size.
    pub fn usage(&self) -> (u64, u64) {
        let region = lock(&self.region);
        (region.size() - region.free_bytes(), region.size())
    }
}

/// A connection placed in a piece of a VM's region: the daemon's view of
/// it. The piece is given back when this is dropped.
#[derive(Debug)]
pub struct Placed {
    vm: Arc<VmMemory>,
    piece: Piece,
    segment: Segment,
}

impl Placed {
    /// Where the piece starts in the region (what the VM is told).
    pub fn offset(&self) -> u64 {
        self.piece.offset
    }

    /// The daemon's view of both halves.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// Is this piece of `vm`'s region?
    pub fn is_of(&self, vm: &Arc<VmMemory>) -> bool {
        Arc::ptr_eq(&self.vm, vm)
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        // The daemon's mapping goes just after this; nothing reads it
        // meanwhile, and a later connection placed in the piece maps it
        // again (and writes fresh headers).
        lock(&self.vm.region).give_back(self.piece);
    }
}

impl Rings for Arc<Placed> {
    fn segment(&self) -> &Segment {
        &self.segment
    }
}

/// The daemon's end of a VM's connection: the piece, and the connection's
/// bell stream from the VM (each byte a wake-up; its end says every
/// process in the VM holding the connection let go, or the VM's
/// attachment went away).
pub type RegionEnd = SegmentEnd<Arc<Placed>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_go_back_when_their_connections_go() {
        let dir = std::env::temp_dir().join(format!("vsocket-placed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vm = Arc::new(VmMemory::create(&dir.join("region"), 4 * segment_size(4096) as u64).unwrap());
        let placed: Vec<Placed> = (0..4).map(|_| vm.place(4096).unwrap()).collect();
        assert_eq!(vm.usage(), (4 * segment_size(4096) as u64, 4 * segment_size(4096) as u64));
        assert!(matches!(vm.place(4096), Err(PlaceError::Full(_))));
        let offsets: Vec<u64> = placed.iter().map(Placed::offset).collect();
        assert_eq!(offsets, [0, 1, 2, 3].map(|i| i * segment_size(4096) as u64));
        drop(placed);
        assert_eq!(vm.usage().0, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
