//! The initramfs format: an uncompressed cpio archive in the "newc" form
//! (ASCII headers), which the kernel unpacks into its first root.

/// A cpio "newc" archive being written.
#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

/// File modes the archive records.
const DIRECTORY: u32 = 0o040_000;
const REGULAR: u32 = 0o100_000;

impl Archive {
    pub fn new() -> Archive {
        Archive { bytes: Vec::new(), next_inode: 1 }
    }

    /// Adds directory `path` (relative, `/`-separated).
    pub fn directory(&mut self, path: &str) {
        self.entry(path, DIRECTORY | 0o755, 2, &[]);
    }

    /// Adds regular file `path` with permissions `mode` and `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, REGULAR | (mode & 0o7777), 1, data);
    }

    /// Ends the archive and returns it.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, &[]);
        self.bytes
    }

    fn entry(&mut self, path: &str, mode: u32, links: u32, data: &[u8]) {
        let inode = if mode == 0 { 0 } else { self.next_inode };
        self.next_inode += 1;
        let name_len = path.len() + 1;
        // magic, inode, mode, uid, gid, links, mtime, size, dev major and
        // minor, rdev major and minor, name size, check: 8 hex digits each.
        let fields = [inode, mode, 0, 0, links, 0, data.len() as u32, 0, 0, 0, 0, name_len as u32, 0];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Header with name, and data, each end on a multiple of four bytes.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an archive back: (path, mode, data) per entry, trailer excluded.
    fn read(mut bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut offset = 0;
        loop {
            assert_eq!(&bytes[..6], b"070701", "magic at {offset}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
            };
            let (mode, size, name_len) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&bytes[110..110 + name_len - 1]).unwrap().to_string();
            assert_eq!(bytes[110 + name_len - 1], 0);
            let data_at = (110 + name_len).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            offset += next;
            bytes = &bytes[next..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                return entries;
            }
            entries.push((name, mode, data));
        }
    }

    #[test]
    fn an_archive_reads_back_entry_by_entry() {
        let mut archive = Archive::new();
        archive.directory("bin");
        archive.file("bin/busybox", 0o755, b"\x7fELF....");
        archive.file("init", 0o755, b"#!/bin/busybox sh\n");
        archive.file("odd", 0o644, b"abc");
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(
            read(&bytes),
            vec![
                ("bin".to_string(), 0o040_755, vec![]),
                ("bin/busybox".to_string(), 0o100_755, b"\x7fELF....".to_vec()),
                ("init".to_string(), 0o100_755, b"#!/bin/busybox sh\n".to_vec()),
                ("odd".to_string(), 0o100_644, b"abc".to_vec()),
            ]
        );
    }
}
