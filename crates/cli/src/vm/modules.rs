//! Kernel modules the guest's initramfs loads, in an order that loads each
//! after the modules it depends on (read from each module's `.modinfo`:
//! the package ships no `modules.dep`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The modules a depends on, from the `depends=` entry of a module's
/// `.modinfo` (NUL-separated `key=value` strings).
pub fn depends_of(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[at + KEY.len()..];
    let value = &value[..value.iter().position(|&b| b == 0).unwrap_or(value.len())];
    String::from_utf8_lossy(value).split(',').filter(|d| !d.is_empty()).map(str::to_string).collect()
}

/// Why the modules could not be gathered.
#[derive(Debug)]
pub enum ModuleError {
    /// No module {0} under the kernel's module tree.
    Missing(String),
    /// Reading {path} failed: {error}
    Read { path: PathBuf, error: std::io::Error },
}

impl std::fmt::Display for ModuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleError::Missing(name) => write!(f, "no kernel module {name} in the guest kernel's package"),
            ModuleError::Read { path, error } => write!(f, "reading {}: {error}", path.display()),
        }
    }
}

/// Every `.ko` under `tree`, by module name.
fn index(tree: &Path) -> Result<BTreeMap<String, PathBuf>, ModuleError> {
    let mut found = BTreeMap::new();
    let mut pending = vec![tree.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|error| ModuleError::Read { path: dir.clone(), error })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                found.insert(name.replace('-', "_"), path);
            }
        }
    }
    Ok(found)
}

/// `wanted` and everything they depend on, found under `tree`, each after
/// its dependencies: (name, contents).
pub fn gather(tree: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>, ModuleError> {
    let index = index(tree)?;
    let mut ordered: Vec<(String, Vec<u8>)> = Vec::new();
    // Depth-first, dependencies first; a module is placed once.
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        ordered: &mut Vec<(String, Vec<u8>)>,
        visiting: &mut Vec<String>,
    ) -> Result<(), ModuleError> {
        let name = name.replace('-', "_");
        if ordered.iter().any(|(n, _)| *n == name) || visiting.contains(&name) {
            return Ok(());
        }
        let path = index.get(&name).ok_or_else(|| ModuleError::Missing(name.clone()))?;
        let bytes = std::fs::read(path).map_err(|error| ModuleError::Read { path: path.clone(), error })?;
        visiting.push(name.clone());
        for dependency in depends_of(&bytes) {
            visit(&dependency, index, ordered, visiting)?;
        }
        visiting.pop();
        ordered.push((name, bytes));
        Ok(())
    }
    let mut visiting = Vec::new();
    for name in wanted {
        visit(name, &index, &mut ordered, &mut visiting)?;
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(depends: &str) -> Vec<u8> {
        let mut bytes = b"\x7fELF junk\0license=GPL\0".to_vec();
        bytes.extend_from_slice(format!("depends={depends}\0name=x\0").as_bytes());
        bytes
    }

    #[test]
    fn dependencies_come_from_modinfo() {
        assert_eq!(depends_of(&module("virtio,9pnet,virtio_ring")), vec!["virtio", "9pnet", "virtio_ring"]);
        assert_eq!(depends_of(&module("")), Vec::<String>::new());
        assert_eq!(depends_of(b"no modinfo here"), Vec::<String>::new());
    }

    #[test]
    fn modules_come_after_what_they_depend_on() {
        let tree = std::env::temp_dir().join(format!("vsocket-modules-{}", std::process::id()));
        std::fs::create_dir_all(tree.join("kernel/fs")).unwrap();
        std::fs::create_dir_all(tree.join("kernel/net")).unwrap();
        for (path, depends) in [
            ("kernel/fs/9p.ko", "9pnet,netfs"),
            ("kernel/net/9pnet.ko", ""),
            ("kernel/fs/netfs.ko", ""),
            ("kernel/net/9pnet_virtio.ko", "virtio,9pnet"),
            ("kernel/net/virtio.ko", "virtio_ring"),
            ("kernel/net/virtio_ring.ko", ""),
        ] {
            std::fs::write(tree.join(path), module(depends)).unwrap();
        }
        let names =
            |wanted: &[&str]| -> Vec<String> { gather(&tree, wanted).unwrap().into_iter().map(|(n, _)| n).collect() };
        assert_eq!(
            names(&["9pnet_virtio", "9p"]),
            vec!["virtio_ring", "virtio", "9pnet", "9pnet_virtio", "netfs", "9p"]
        );
        assert!(matches!(gather(&tree, &["vsock"]), Err(ModuleError::Missing(name)) if name == "vsock"));
        std::fs::remove_dir_all(&tree).unwrap();
    }
}
