//! What the provisioning server gives one enclave instance (`spec/provisioning.md` §4, §5):
//! the [`Grant`], released by HPKE (RFC 9180) to the enclave's attested key, and
//! [`TopUp`] tokens, signed by the server, that raise that instance's budget.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;
use crate::key::{CAPSULE_ID_LEN, KEY_LEN, ModelKey};

/// HPKE `info` for a grant (provisioning §5).
const GRANT_INFO: &[u8] = b"mlcapsule/v1 grant";
/// Prefix of a top-up token's text form (provisioning §6).
pub const TOPUP_PREFIX: &str = "mlcapsule-topup/v1.";
/// Domain separation for the top-up signature.
const TOPUP_CONTEXT: &[u8] = b"mlcapsule/v1 topup\n";

/// Length of an enclave instance id.
pub const INSTANCE_ID_LEN: usize = 16;

/// The licence terms and model key released to one enclave instance.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The licence this grant provisions.
    pub licence_id: String,
    /// The enclave instance it is bound to (chosen by the server).
    #[serde(with = "hex")]
    pub instance_id: [u8; INSTANCE_ID_LEN],
    /// The capsule the model key opens.
    #[serde(with = "hex")]
    pub capsule_id: [u8; CAPSULE_ID_LEN],
    /// The model key, hex.
    model_key: Zeroizing<String>,
    /// Queries granted so far (cumulative; top-ups raise it).
    pub queries: u64,
    /// Last day the model may run (UTC, `YYYY-MM-DD`), if any.
    pub expires: Option<String>,
    /// The server's Ed25519 public key, which signs top-up tokens.
    #[serde(with = "hex")]
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("licence_id", &self.licence_id)
            .field("instance_id", &hex::encode(self.instance_id))
            .field("queries", &self.queries)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// A grant carrying `model_key`.
    pub fn new(
        licence_id: String,
        instance_id: [u8; INSTANCE_ID_LEN],
        capsule_id: [u8; CAPSULE_ID_LEN],
        model_key: &ModelKey,
        queries: u64,
        expires: Option<String>,
        server_key: [u8; 32],
    ) -> Grant {
        Grant {
            licence_id,
            instance_id,
            capsule_id,
            model_key: Zeroizing::new(hex::encode(model_key.expose())),
            queries,
            expires,
            server_key,
        }
    }

    /// The model key.
    pub fn model_key(&self) -> Result<ModelKey, Error> {
        let mut bytes = [0u8; KEY_LEN];
        hex::decode_to_slice(self.model_key.as_str(), &mut bytes)
            .map_err(|_| Error::InvalidGrant)?;
        let key = ModelKey::from_bytes(bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        Ok(key)
    }

    /// The grant as JSON, zeroized on drop (it holds the model key).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(self).expect("a Grant always serialises"))
    }

    /// Parses [`Grant::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Grant, Error> {
        serde_json::from_slice(bytes).map_err(|_| Error::InvalidGrant)
    }
}

/// An enclave's X25519 key pair for receiving a grant. The secret never leaves the enclave.
pub struct EnclaveKey {
    secret: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl EnclaveKey {
    /// A fresh key pair.
    pub fn generate() -> EnclaveKey {
        let (secret, public) = X25519HkdfSha256::gen_keypair();
        EnclaveKey {
            secret,
            public: public.to_bytes().into(),
        }
    }

    /// The public key, to be bound into attestation evidence.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Opens a grant sealed to this key by [`seal_grant`] with the same `context`.
    pub fn open_grant(&self, sealed: &SealedGrant, context: &[u8]) -> Result<Grant, Error> {
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(&sealed.enc)
            .map_err(|_| Error::InvalidGrant)?;
        let plaintext = Zeroizing::new(
            hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
                &OpModeR::Base,
                &self.secret,
                &enc,
                GRANT_INFO,
                &sealed.ciphertext,
                context,
            )
            .map_err(|_| Error::InvalidGrant)?,
        );
        Grant::from_bytes(&plaintext)
    }
}

/// A grant encrypted to one enclave key: HPKE base mode, DHKEM(X25519, HKDF-SHA256),
/// HKDF-SHA256, AES-256-GCM (provisioning §5).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealedGrant {
    /// The encapsulated key.
    #[serde(with = "hex")]
    pub enc: Vec<u8>,
    /// The encrypted grant.
    #[serde(with = "hex")]
    pub ciphertext: Vec<u8>,
}

/// Encrypts `grant` to `enclave_public`; `context` (the setup nonce) is bound as associated data.
pub fn seal_grant(
    grant: &Grant,
    enclave_public: &[u8; 32],
    context: &[u8],
) -> Result<SealedGrant, Error> {
    let pk = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(enclave_public)
        .map_err(|_| Error::InvalidGrant)?;
    let (enc, ciphertext) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &pk,
        GRANT_INFO,
        &grant.to_bytes(),
        context,
    )
    .map_err(|_| Error::InvalidGrant)?;
    Ok(SealedGrant {
        enc: enc.to_bytes().to_vec(),
        ciphertext,
    })
}

/// A signed raise of one instance's budget (provisioning §6).
///
/// `total_queries` is cumulative and `seq` strictly increases per instance, so a
/// replayed or older token changes nothing and is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopUp {
    /// The licence.
    pub licence_id: String,
    /// The only instance that may apply it.
    #[serde(with = "hex")]
    pub instance_id: [u8; INSTANCE_ID_LEN],
    /// Sequence number, from 1, strictly increasing per instance.
    pub seq: u64,
    /// Queries granted in total after this top-up.
    pub total_queries: u64,
    /// Expiry after this top-up.
    pub expires: Option<String>,
}

impl TopUp {
    /// Signs the token: `TOPUP_PREFIX || b64(json) || "." || b64(sig)`.
    pub fn sign(&self, server: &Ed25519KeyPair) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = serde_json::to_vec(self).expect("a TopUp always serialises");
        let sig = server.sign(&[TOPUP_CONTEXT, &body].concat());
        format!(
            "{TOPUP_PREFIX}{}.{}",
            b64.encode(&body),
            b64.encode(sig.as_ref())
        )
    }

    /// Verifies a token's signature against `server_key` and parses it.
    /// The caller checks instance id and sequence number.
    pub fn verify(token: &str, server_key: &[u8; 32]) -> Result<TopUp, Error> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let rest = token
            .trim()
            .strip_prefix(TOPUP_PREFIX)
            .ok_or(Error::InvalidToken)?;
        let (body, sig) = rest.split_once('.').ok_or(Error::InvalidToken)?;
        let body = b64.decode(body).map_err(|_| Error::InvalidToken)?;
        let sig = b64.decode(sig).map_err(|_| Error::InvalidToken)?;
        UnparsedPublicKey::new(&ED25519, server_key)
            .verify(&[TOPUP_CONTEXT, &body].concat(), &sig)
            .map_err(|_| Error::InvalidToken)?;
        serde_json::from_slice(&body).map_err(|_| Error::InvalidToken)
    }
}

/// The 64 bytes an enclave asks its platform to attest during setup
/// (provisioning §4): `SHA-512("mlcapsule/v1 report\n" || enclave_public || instance_id || nonce)`.
/// Binding the key, the instance and the server's fresh nonce means evidence
/// cannot be replayed for another key, instance or setup.
pub fn report_data(
    enclave_public: &[u8; 32],
    instance_id: &[u8; INSTANCE_ID_LEN],
    nonce: &[u8],
) -> [u8; 64] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA512);
    ctx.update(b"mlcapsule/v1 report\n");
    ctx.update(enclave_public);
    ctx.update(instance_id);
    ctx.update(nonce);
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-512 is 64 bytes")
}

/// The Ed25519 public key of a server signing key.
pub fn server_public_key(server: &Ed25519KeyPair) -> [u8; 32] {
    server
        .public_key()
        .as_ref()
        .try_into()
        .expect("Ed25519 public keys are 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;

    fn server() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn grant(server: &Ed25519KeyPair) -> Grant {
        Grant::new(
            "lic-1".into(),
            [1; 16],
            [2; 16],
            &ModelKey::from_bytes([3; 32]),
            5,
            None,
            server_public_key(server),
        )
    }

    #[test]
    fn grant_opens_only_with_the_enclave_key_and_context() {
        let server = server();
        let enclave = EnclaveKey::generate();
        let sealed = seal_grant(&grant(&server), &enclave.public(), b"nonce-1").unwrap();
        let opened = enclave.open_grant(&sealed, b"nonce-1").unwrap();
        assert_eq!(opened.model_key().unwrap().expose(), &[3; 32]);
        assert_eq!(opened.queries, 5);
        assert!(matches!(
            enclave.open_grant(&sealed, b"nonce-2"),
            Err(Error::InvalidGrant)
        ));
        let other = EnclaveKey::generate();
        assert!(matches!(
            other.open_grant(&sealed, b"nonce-1"),
            Err(Error::InvalidGrant)
        ));
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert!(enclave.open_grant(&tampered, b"nonce-1").is_err());
    }

    #[test]
    fn grant_debug_hides_the_model_key() {
        let text = format!("{:?}", grant(&server()));
        assert!(!text.contains("0303"), "{text}");
    }

    #[test]
    fn topup_verifies_only_unmodified_and_with_the_right_key() {
        let server = server();
        let t = TopUp {
            licence_id: "lic-1".into(),
            instance_id: [1; 16],
            seq: 1,
            total_queries: 10,
            expires: None,
        };
        let token = t.sign(&server);
        assert_eq!(
            TopUp::verify(&token, &server_public_key(&server)).unwrap(),
            t
        );
        assert!(TopUp::verify(&token, &server_public_key(&self::server())).is_err());
        let mut bad = token.clone().into_bytes();
        let mid = TOPUP_PREFIX.len() + 5;
        bad[mid] = if bad[mid] == b'A' { b'B' } else { b'A' };
        assert!(
            TopUp::verify(
                std::str::from_utf8(&bad).unwrap(),
                &server_public_key(&server)
            )
            .is_err()
        );
        assert!(TopUp::verify("garbage", &server_public_key(&server)).is_err());
    }
}
