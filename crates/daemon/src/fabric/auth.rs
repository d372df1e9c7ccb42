//! Proving a fabric key at link set-up.
//!
//! With `[fabric] key_file`, every host holds the same secret. Each side's
//! `Hello` carries a fresh random nonce; once it has the other side's
//! `Hello`, each side sends a `Proof`: HMAC-SHA256 under the key over a
//! label, the sender's and the receiver's names and the sender's and the
//! receiver's nonces. A side takes a link only when the other's proof
//! checks out, so a host that does not hold the key can neither join (as
//! a dialer) nor stand in for a configured host that dials it (as a
//! listener). A proof answers one pair of nonces and names: it cannot be
//! replayed on another link, nor reflected back to its sender.
//!
//! The proof covers link set-up only: frames after it are not protected.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use vsocket_abi::fabric::{NONCE, PROOF};
use vsocket_policy::FabricKey;

/// Says what the MAC is for, so that it cannot serve another purpose.
const LABEL: &[u8] = b"vsocket fabric link proof v2";

fn mac(key: &FabricKey) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    Hmac::<Sha256>::new_from_slice(key.bytes()).unwrap_or_else(|_| unreachable!("HMAC accepts every key length"))
}

fn feed(
    mac: &mut Hmac<Sha256>,
    sender: &str,
    receiver: &str,
    sender_nonce: &[u8; NONCE],
    receiver_nonce: &[u8; NONCE],
) {
    mac.update(LABEL);
    for name in [sender, receiver] {
        mac.update(&(name.len() as u32).to_le_bytes());
        mac.update(name.as_bytes());
    }
    mac.update(sender_nonce);
    mac.update(receiver_nonce);
}

/// The proof `sender` sends `receiver`.
pub fn prove(
    key: &FabricKey,
    sender: &str,
    receiver: &str,
    sender_nonce: &[u8; NONCE],
    receiver_nonce: &[u8; NONCE],
) -> [u8; PROOF] {
    let mut m = mac(key);
    feed(&mut m, sender, receiver, sender_nonce, receiver_nonce);
    m.finalize().into_bytes().into()
}

/// Does `proof` show that `sender` holds the key? Compared in constant time.
pub fn check(
    key: &FabricKey,
    proof: &[u8; PROOF],
    sender: &str,
    receiver: &str,
    sender_nonce: &[u8; NONCE],
    receiver_nonce: &[u8; NONCE],
) -> bool {
    let mut m = mac(key);
    feed(&mut m, sender, receiver, sender_nonce, receiver_nonce);
    m.verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> FabricKey {
        let dir = std::env::temp_dir().join(format!("vsocket-auth-{}-{text}", std::process::id()));
        std::fs::write(&dir, text).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let config = vsocket_policy::FabricConfig {
            kind: vsocket_policy::FabricKind::Tcp,
            ring_size: 1 << 20,
            hosts: Vec::new(),
            key_file: Some(dir.clone()),
            busy_poll_us: 0,
        };
        let key = config.load_key().unwrap().unwrap();
        std::fs::remove_file(&dir).unwrap();
        key
    }

    #[test]
    fn a_proof_checks_only_for_its_key_names_and_nonces() {
        let (k, other) = (key("0123456789abcdef-one"), key("0123456789abcdef-two"));
        let (na, nb) = ([1u8; NONCE], [2u8; NONCE]);
        let proof = prove(&k, "host1", "host2", &na, &nb);
        assert!(check(&k, &proof, "host1", "host2", &na, &nb));
        assert!(!check(&other, &proof, "host1", "host2", &na, &nb), "another key");
        assert!(!check(&k, &proof, "host2", "host1", &nb, &na), "reflected to its sender");
        assert!(!check(&k, &proof, "host1", "host2", &na, &[3; NONCE]), "replayed on another link");
        assert!(!check(&k, &proof, "host3", "host2", &na, &nb), "another sender");
        let mut bent = proof;
        bent[0] ^= 1;
        assert!(!check(&k, &bent, "host1", "host2", &na, &nb));
        // Names are length-prefixed: moving a byte between them changes the proof.
        assert_ne!(prove(&k, "ab", "c", &na, &nb), prove(&k, "a", "bc", &na, &nb));
    }
}
