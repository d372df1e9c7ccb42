//! The store as `vsocket lab` and `vsocket run` see it, beside the
//! fleet's operations vsocketctl uses (`vsocket_etcd::fleet`).

pub use vsocket_etcd::fleet::*;

use vsocket_etcd::Client;
use vsocket_policy::store::Layout;

/// The config at `path`, with the tenant model the store it names holds
/// (as vsocketd reads it), or the file alone if it names none: what
/// `vsocket lab` and `vsocket run` act on. With the store unreachable, or
/// holding a model this host cannot take (one that no longer names it,
/// once it left the fleet), the model the host's daemon last applied from
/// it (its snapshot in run_dir), else the file's own, each said on
/// stderr: tearing a lab down must need neither etcd nor the host's place
/// in the fleet.
pub fn load_config(path: &std::path::Path) -> Result<vsocket_policy::Config, vsocket_policy::ConfigError> {
    let (local, config) = vsocket_policy::load_document(path)?;
    let Some(settings) = config.host().store.clone() else { return Ok(config) };
    let origin = settings.origin();
    let layout = Layout::new(&settings.prefix);
    let assemble = |seen: &Seen| vsocket_policy::store::assemble(&local, &seen.entries(), &layout, &origin);
    let read = Client::new(&settings.endpoints, std::time::Duration::from_secs(5))
        .map_err(|e| e.to_string())
        .and_then(|client| read_model(&client, &layout).map_err(|e| e.to_string()))
        .and_then(|seen| assemble(&seen).map_err(|e| e.to_string()));
    let error = match read {
        Ok((_, config)) => return Ok(config),
        Err(error) => error,
    };
    let snapshot = config.host().run_dir.join(SNAPSHOT_FILE);
    if let Some((_, kept)) = Seen::load(&snapshot).and_then(|kept| assemble(&kept).ok()) {
        eprintln!("{}: {error}; using the model last applied from it ({})", origin.display(), snapshot.display());
        return Ok(kept);
    }
    eprintln!("{}: {error}; using {}'s own model", origin.display(), path.display());
    Ok(config)
}
