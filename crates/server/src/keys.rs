//! The server's secrets, each a file in the data directory (`spec/provisioning.md` §7):
//! the master key that wraps model keys, the Ed25519 key that signs top-ups, and the admin
//! token. Files are created `0600`, written to a temporary name and linked into place, so a
//! crash never leaves a half-written secret and two starts never create two different ones.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use capsule_format::{CAPSULE_ID_LEN, KEY_LEN, ModelKey};
use zeroize::Zeroizing;

use crate::Error;

/// The master key file: 32 random bytes.
pub const MASTER_KEY_FILE: &str = "master-key";
/// The top-up signing key file: Ed25519, PKCS#8 v2 (RFC 5958), as `aws-lc-rs` writes it.
pub const SIGNING_KEY_FILE: &str = "server-signing-key.pk8";
/// The admin token file: one line of text.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Prefix of admin tokens the server generates.
const ADMIN_TOKEN_PREFIX: &str = "mlc-admin-v1.";
/// Shortest admin token accepted from the file (an operator may write their own).
const MIN_ADMIN_TOKEN_LEN: usize = 24;
/// Associated-data prefix of a wrapped model key; the capsule id follows.
const MODEL_KEY_AAD: &[u8] = b"mlcapsule/v1 model key\n";

/// The server's loaded secrets.
pub(crate) struct ServerKeys {
    master: LessSafeKey,
    signer: Ed25519KeyPair,
    server_key: [u8; 32],
    admin_digest: [u8; 32],
    pub(crate) admin_token_path: PathBuf,
    pub(crate) admin_token_created: bool,
}

impl ServerKeys {
    /// Loads the secrets from `dir`, creating any that are missing. The master and signing
    /// keys are only created when `first_start` (no database yet): once model keys are
    /// wrapped or top-ups signed, a replacement would silently break them. A missing admin
    /// token is always created: deleting the file and restarting rotates it.
    pub(crate) fn load_or_create(dir: &Path, first_start: bool) -> Result<ServerKeys, Error> {
        let rng = SystemRandom::new();

        let master_path = dir.join(MASTER_KEY_FILE);
        let master_bytes = match read_secret(&master_path)? {
            Some(bytes) => bytes,
            None if first_start => {
                let mut bytes = Zeroizing::new(vec![0u8; KEY_LEN]);
                rng.fill(&mut bytes).map_err(|_| rng_failed(&master_path))?;
                create_secret(&master_path, &bytes)?;
                bytes
            }
            None => return Err(Error::MissingSecretFile { path: master_path }),
        };
        let master = UnboundKey::new(&AES_256_GCM, &master_bytes)
            .map(LessSafeKey::new)
            .map_err(|_| Error::InvalidSecretFile {
                path: master_path.clone(),
            })?;

        let signing_path = dir.join(SIGNING_KEY_FILE);
        let pkcs8 = match read_secret(&signing_path)? {
            Some(bytes) => bytes,
            None if first_start => {
                let doc =
                    Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| rng_failed(&signing_path))?;
                let bytes = Zeroizing::new(doc.as_ref().to_vec());
                create_secret(&signing_path, &bytes)?;
                bytes
            }
            None => return Err(Error::MissingSecretFile { path: signing_path }),
        };
        let signer = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| Error::InvalidSecretFile { path: signing_path })?;
        let server_key = capsule_format::server_public_key(&signer);

        let admin_token_path = dir.join(ADMIN_TOKEN_FILE);
        let (admin_token, admin_token_created) = match read_secret(&admin_token_path)? {
            Some(bytes) => {
                let text = std::str::from_utf8(&bytes)
                    .map(|t| Zeroizing::new(t.trim().to_owned()))
                    .map_err(|_| Error::InvalidSecretFile {
                        path: admin_token_path.clone(),
                    })?;
                if text.len() < MIN_ADMIN_TOKEN_LEN {
                    return Err(Error::InvalidSecretFile {
                        path: admin_token_path,
                    });
                }
                (text, false)
            }
            None => {
                let token = Zeroizing::new(random_token(ADMIN_TOKEN_PREFIX, &rng)?);
                create_secret(&admin_token_path, format!("{}\n", *token).as_bytes())?;
                (token, true)
            }
        };
        let admin_digest = sha256(admin_token.as_bytes());

        Ok(ServerKeys {
            master,
            signer,
            server_key,
            admin_digest,
            admin_token_path,
            admin_token_created,
        })
    }

    /// The Ed25519 key that signs top-up tokens.
    pub(crate) fn signer(&self) -> &Ed25519KeyPair {
        &self.signer
    }

    /// Its public half, as given to enclaves in grants.
    pub(crate) fn server_key(&self) -> [u8; 32] {
        self.server_key
    }

    /// Whether `presented` is the admin token. Compares SHA-256 digests without an early
    /// exit, so timing says nothing about how much of a guess was right.
    pub(crate) fn is_admin_token(&self, presented: &str) -> bool {
        let digest = sha256(presented.trim().as_bytes());
        digest
            .iter()
            .zip(self.admin_digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Wraps a model key under the master key: `nonce || ciphertext || tag`, with the
    /// capsule id as associated data, so a wrapped key moved to another model's row fails.
    pub(crate) fn wrap_model_key(
        &self,
        capsule_id: &[u8; CAPSULE_ID_LEN],
        key: &ModelKey,
    ) -> Result<Vec<u8>, aws_lc_rs::error::Unspecified> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce)?;
        let mut buf = key.expose().to_vec();
        self.master.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from([MODEL_KEY_AAD, capsule_id].concat()),
            &mut buf,
        )?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Unwraps [`ServerKeys::wrap_model_key`] output.
    pub(crate) fn unwrap_model_key(
        &self,
        capsule_id: &[u8; CAPSULE_ID_LEN],
        wrapped: &[u8],
    ) -> Option<ModelKey> {
        let (nonce, sealed) = wrapped.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        let plain = self
            .master
            .open_in_place(
                nonce,
                Aad::from([MODEL_KEY_AAD, capsule_id].concat()),
                &mut buf,
            )
            .ok()?;
        let bytes: [u8; KEY_LEN] = plain.try_into().ok()?;
        Some(ModelKey::from_bytes(bytes))
    }
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// `prefix` followed by 32 random bytes in unpadded base64url.
pub(crate) fn random_token(prefix: &str, rng: &SystemRandom) -> Result<String, Error> {
    let mut secret = Zeroizing::new([0u8; 32]);
    rng.fill(secret.as_mut()).map_err(|_| Error::Io {
        path: PathBuf::from("/dev/urandom"),
        source: std::io::Error::other("the operating system's random generator failed"),
    })?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret.as_ref())
    ))
}

fn rng_failed(path: &Path) -> Error {
    Error::Io {
        path: path.to_owned(),
        source: std::io::Error::other("the operating system's random generator failed"),
    }
}

/// The file's bytes, or `None` if it does not exist. Warns if others may read it.
fn read_secret(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
    match fs::read(path) {
        Ok(bytes) => {
            let mode = fs::metadata(path)
                .map_err(|source| Error::Io {
                    path: path.to_owned(),
                    source,
                })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "secret file is readable by other users; chmod 600 it"
                );
            }
            Ok(Some(Zeroizing::new(bytes)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes a new `0600` file at `path` with `bytes`, never replacing an existing one.
fn create_secret(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    // A hard link fails if the target exists: of two racing starts, one secret wins and
    // the loser reads it on its next start instead of overwriting it.
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    linked.map_err(io)?;
    if let Some(parent) = path.parent()
        && let Ok(dir) = fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_keys_unwrap_only_for_their_capsule() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ServerKeys::load_or_create(dir.path(), true).unwrap();
        let key = ModelKey::from_bytes([9; KEY_LEN]);
        let wrapped = keys.wrap_model_key(&[1; CAPSULE_ID_LEN], &key).unwrap();
        assert_eq!(wrapped.len(), NONCE_LEN + KEY_LEN + 16);
        assert!(!wrapped.windows(KEY_LEN).any(|w| w == [9; KEY_LEN]));
        let back = keys
            .unwrap_model_key(&[1; CAPSULE_ID_LEN], &wrapped)
            .unwrap();
        assert_eq!(back.expose(), key.expose());
        assert!(
            keys.unwrap_model_key(&[2; CAPSULE_ID_LEN], &wrapped)
                .is_none()
        );
        let mut bad = wrapped.clone();
        bad[NONCE_LEN] ^= 1;
        assert!(keys.unwrap_model_key(&[1; CAPSULE_ID_LEN], &bad).is_none());
        assert!(
            keys.unwrap_model_key(&[1; CAPSULE_ID_LEN], &[0; 5])
                .is_none()
        );
    }

    #[test]
    fn keys_are_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = ServerKeys::load_or_create(dir.path(), true).unwrap();
        assert!(a.admin_token_created);
        let b = ServerKeys::load_or_create(dir.path(), false).unwrap();
        assert!(!b.admin_token_created);
        assert_eq!(a.server_key(), b.server_key());
        assert_eq!(a.admin_digest, b.admin_digest);
        let token = fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        assert!(b.is_admin_token(&token));
        assert!(!b.is_admin_token("mlc-admin-v1.wrong"));
        for f in [MASTER_KEY_FILE, SIGNING_KEY_FILE, ADMIN_TOKEN_FILE] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn a_lost_master_key_is_not_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        ServerKeys::load_or_create(dir.path(), true).unwrap();
        fs::remove_file(dir.path().join(MASTER_KEY_FILE)).unwrap();
        assert!(matches!(
            ServerKeys::load_or_create(dir.path(), false),
            Err(Error::MissingSecretFile { .. })
        ));
        fs::write(dir.path().join(MASTER_KEY_FILE), b"short").unwrap();
        assert!(matches!(
            ServerKeys::load_or_create(dir.path(), false),
            Err(Error::InvalidSecretFile { .. })
        ));
    }
}
