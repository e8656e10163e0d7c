//! Reading a capsule (capsule-v1 §3 to §6): locate without the key, open with it.

use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use crate::chunk::{ChunkKey, ChunkPosition, TAG_LEN};
use crate::header::{Header, LayerEntry};
use crate::key::ModelKey;
use crate::{Error, MAC_LEN, MAX_HEADER_LEN, VERSION_LINE};

/// A weight tensor opened from a capsule: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Where a capsule's parts lie (capsule-v1 §3, §6), found from its prefix and its
/// length alone: a host that streams a capsule file to the enclave reads the prefix,
/// then each layer's sealed bytes where this says, and never holds the whole file.
///
/// Like [`Capsule::parse`], it authenticates nothing: the header is checked for
/// structure only, until the enclave has checked its MAC.
#[derive(Clone, Debug)]
pub struct CapsuleLayout {
    header: Header,
    /// End of the MAC'd prefix (version line, length, header).
    mac_start: usize,
    /// Start of each layer's sealed stream, plus the end of the last one.
    layer_bounds: Vec<u64>,
}

impl CapsuleLayout {
    /// Bytes a capsule's first read must hold for [`CapsuleLayout::prefix_len`]: the
    /// version line and the header length.
    pub const START_LEN: usize = VERSION_LINE.len() + 4;

    /// The length of the prefix (version line, header length, header, MAC) of the
    /// capsule that starts with `start`, its first [`CapsuleLayout::START_LEN`] bytes
    /// or more. Fails as [`Capsule::parse`] does on a wrong version line or header
    /// length.
    pub fn prefix_len(start: &[u8]) -> Result<usize, Error> {
        let header_len = header_len(start)?;
        Ok(Self::START_LEN + header_len + MAC_LEN)
    }

    /// The layout of a capsule of `total_len` bytes that starts with `bytes` (its
    /// prefix, or more of it). Fails as [`Capsule::parse`] does: a malformed prefix,
    /// or a length that is not the one the header gives ([`Error::Truncated`],
    /// [`Error::TrailingData`]).
    pub fn parse(bytes: &[u8], total_len: u64) -> Result<CapsuleLayout, Error> {
        let (header, mac_start) = parse_prefix(bytes)?;
        let mut layer_bounds = Vec::with_capacity(header.layers.len() + 1);
        let mut end = (mac_start + MAC_LEN) as u64;
        layer_bounds.push(end);
        for layer in 0..header.layers.len() {
            end = end.saturating_add(header.sealed_len(layer));
            layer_bounds.push(end);
        }
        if total_len < end {
            return Err(Error::Truncated {
                expected: end,
                found: total_len,
            });
        }
        if total_len > end {
            return Err(Error::TrailingData {
                expected: end,
                found: total_len,
            });
        }
        Ok(CapsuleLayout {
            header,
            mac_start,
            layer_bounds,
        })
    }

    /// The public header. Unauthenticated until the enclave checks its MAC.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The length of the prefix: where the first layer's sealed stream starts.
    pub fn prefix_end(&self) -> usize {
        self.mac_start + MAC_LEN
    }

    /// Where layer `layer`'s sealed stream lies in the capsule.
    ///
    /// # Panics
    ///
    /// When the header has no layer `layer`.
    pub fn sealed_range(&self, layer: usize) -> std::ops::Range<u64> {
        self.layer_bounds[layer]..self.layer_bounds[layer + 1]
    }
}

/// A parsed capsule: header read and structure checked, nothing decrypted.
///
/// Parsing needs no key, so `inspect` and the untrusted host can read the
/// public header and find each layer's sealed bytes. Nothing in the header is
/// authenticated until [`Capsule::unseal`] has checked the MAC.
#[derive(Debug)]
pub struct Capsule<'a> {
    bytes: &'a [u8],
    layout: CapsuleLayout,
}

impl<'a> Capsule<'a> {
    /// Parses capsule bytes and checks the layout rules of capsule-v1 §3 and §4.
    pub fn parse(bytes: &'a [u8]) -> Result<Capsule<'a>, Error> {
        let layout = CapsuleLayout::parse(bytes, bytes.len() as u64)?;
        Ok(Capsule { bytes, layout })
    }

    /// The public header. Unauthenticated until [`Capsule::unseal`] succeeds.
    pub fn header(&self) -> &Header {
        &self.layout.header
    }

    /// Layer `layer`'s sealed stream, as the host streams it to the enclave.
    pub fn sealed_layer(&self, layer: usize) -> &'a [u8] {
        let range = self.layout.sealed_range(layer);
        // The whole capsule is in memory (`parse` checked its length), so the range fits.
        &self.bytes[range.start as usize..range.end as usize]
    }

    /// The capsule's *prefix*: version line, header length, header and MAC
    /// (capsule-v1 §3), everything [`Unsealer::open_prefix`] needs to check the
    /// header without the payload.
    pub fn prefix(&self) -> &'a [u8] {
        &self.bytes[..self.layout.prefix_end()]
    }

    /// Checks the header MAC with `key` and returns an [`Unsealer`] for the payload.
    pub fn unseal(&self, key: &ModelKey) -> Result<Unsealer, Error> {
        Unsealer::verified(
            self.layout.header.clone(),
            self.prefix(),
            self.layout.mac_start,
            key,
        )
    }

    /// Opens every layer and returns each tensor's values, in tensor-table order.
    pub fn open_all(&self, key: &ModelKey) -> Result<Vec<NamedTensor>, Error> {
        let unsealer = self.unseal(key)?;
        let mut out = Vec::with_capacity(self.header().tensors.len());
        for layer in 0..self.header().layers.len() {
            let plaintext = unsealer.open_layer(layer, self.sealed_layer(layer))?;
            out.extend(unsealer.layer_tensors(layer, &plaintext));
        }
        Ok(out)
    }
}

/// Reads version line, header length and header (capsule-v1 §3, §4) and
/// returns the header and where the MAC starts. Checks that the MAC is
/// present, not what follows it.
fn parse_prefix(bytes: &[u8]) -> Result<(Header, usize), Error> {
    let header_len = header_len(bytes)?;
    let rest = &bytes[CapsuleLayout::START_LEN..];
    let mac_start = CapsuleLayout::START_LEN + header_len;
    if rest.len() < header_len + MAC_LEN {
        return Err(truncated(mac_start + MAC_LEN, bytes.len()));
    }
    let header: Header =
        serde_json::from_slice(&rest[..header_len]).map_err(|e| Error::InvalidHeader {
            reason: format!("header JSON: {e}"),
        })?;
    header.validate()?;
    Ok((header, mac_start))
}

/// Checks the version line at the start of `bytes` and returns the header length
/// that follows it (capsule-v1 §3).
fn header_len(bytes: &[u8]) -> Result<usize, Error> {
    let first_line_end = bytes.iter().take(64).position(|&b| b == b'\n');
    if !bytes.starts_with(VERSION_LINE) {
        return Err(match first_line_end {
            Some(end) if bytes.starts_with(b"mlcapsule/") => Error::UnsupportedVersion {
                found: String::from_utf8_lossy(&bytes[..end]).into_owned(),
            },
            _ => Error::NotACapsule,
        });
    }
    let after_line = &bytes[VERSION_LINE.len()..];
    let Some(len_bytes) = after_line.first_chunk::<4>() else {
        return Err(truncated(CapsuleLayout::START_LEN, bytes.len()));
    };
    let header_len = u32::from_be_bytes(*len_bytes) as usize;
    if header_len == 0 || header_len > MAX_HEADER_LEN {
        return Err(Error::InvalidHeader {
            reason: format!("header length {header_len} is out of range"),
        });
    }
    Ok(header_len)
}

fn truncated(expected: usize, found: usize) -> Error {
    Error::Truncated {
        expected: expected as u64,
        found: found as u64,
    }
}

/// Opens the sealed layers of one capsule whose header MAC has been checked.
pub struct Unsealer {
    header: Header,
    key: ChunkKey,
}

impl Unsealer {
    /// Checks a capsule's header MAC from its prefix alone ([`Capsule::prefix`]:
    /// version line, header length, header, MAC; capsule-v1 §3, §5), without
    /// the payload. This is how an enclave that receives sealed layers one by
    /// one from an untrusted host authenticates the header first.
    ///
    /// Fails like [`Capsule::parse`] on a malformed prefix, with
    /// [`Error::TrailingData`] if bytes follow the MAC, and like
    /// [`Capsule::unseal`] if the MAC does not verify.
    pub fn open_prefix(prefix: &[u8], key: &ModelKey) -> Result<Unsealer, Error> {
        let (header, mac_start) = parse_prefix(prefix)?;
        let end = mac_start + MAC_LEN;
        if prefix.len() > end {
            return Err(Error::TrailingData {
                expected: end as u64,
                found: prefix.len() as u64,
            });
        }
        Unsealer::verified(header, prefix, mac_start, key)
    }

    /// Checks the MAC at `prefix[mac_start..]` over `prefix[..mac_start]` (capsule-v1 §5).
    fn verified(
        header: Header,
        prefix: &[u8],
        mac_start: usize,
        key: &ModelKey,
    ) -> Result<Unsealer, Error> {
        let keys = key.schedule(&header.capsule_id, header.aead);
        let mac_key = hmac::Key::new(hmac::HMAC_SHA256, keys.header.as_ref());
        let tag = &prefix[mac_start..mac_start + MAC_LEN];
        if hmac::verify(&mac_key, &prefix[..mac_start], tag).is_err() {
            // The key id is public; comparing it leaks nothing the MAC does not.
            return Err(if keys.key_id == header.key_id {
                Error::HeaderModified
            } else {
                Error::WrongKey
            });
        }
        let key = ChunkKey::new(header.aead, &keys.payload, header.capsule_id);
        Ok(Unsealer { header, key })
    }

    /// The authenticated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The chunk table's entry of layer `layer`.
    fn layer_entry(&self, layer: usize) -> Result<&LayerEntry, Error> {
        self.header
            .layers
            .get(layer)
            .ok_or_else(|| Error::InvalidHeader {
                reason: format!("no layer {layer}"),
            })
    }

    /// Decrypts layer `layer` from its sealed stream (capsule-v1 §6).
    ///
    /// The plaintext is zeroized when dropped. Fails, naming the first chunk
    /// that does not authenticate, if the stream was altered, reordered,
    /// truncated or spliced.
    pub fn open_layer(&self, layer: usize, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let entry = self.layer_entry(layer)?;
        let failed = |chunk| Error::ChunkFailed {
            layer: entry.name.clone(),
            chunk,
        };
        let n = self.header.chunk_count(layer);
        if sealed.len() as u64 != self.header.sealed_len(layer) {
            return Err(failed(0));
        }
        let sealed_chunk = self.header.chunk_size as usize + TAG_LEN;
        let mut plaintext =
            Zeroizing::new(Vec::with_capacity(entry.plaintext_len as usize + TAG_LEN));
        // Room for one tag too, so the buffer never reallocates and leaves a plaintext copy behind.
        for (i, piece) in sealed.chunks(sealed_chunk).enumerate() {
            let i = i as u64;
            let start = plaintext.len();
            plaintext.extend_from_slice(piece);
            let at = ChunkPosition {
                layer: layer as u32,
                index: i,
                last: i + 1 == n,
            };
            if self.key.open_in_place(at, &mut plaintext[start..]).is_err() {
                return Err(failed(i));
            }
            let opened = plaintext.len() - TAG_LEN;
            plaintext.truncate(opened);
        }
        Ok(plaintext)
    }

    /// The plaintext bytes of layer `layer` that chunk `chunk` holds: as
    /// [`Header::chunk_span`].
    pub fn chunk_span(&self, layer: usize, chunk: u64) -> std::ops::Range<u64> {
        self.header.chunk_span(layer, chunk)
    }

    /// Chunk `chunk` of layer `layer`'s sealed stream `sealed` (ciphertext and tag),
    /// or `None` if the stream has no such chunk.
    pub fn sealed_chunk<'s>(&self, layer: usize, sealed: &'s [u8], chunk: u64) -> Option<&'s [u8]> {
        let sealed_chunk = self.header.chunk_size as usize + TAG_LEN;
        let start = usize::try_from(chunk).ok()?.checked_mul(sealed_chunk)?;
        if chunk >= self.header.chunk_count(layer) {
            return None;
        }
        let end = start.saturating_add(sealed_chunk).min(sealed.len());
        sealed.get(start..end)
    }

    /// Decrypts chunk `chunk` of layer `layer` (capsule-v1 §6) from its sealed bytes
    /// straight into `out`, which must be the chunk's plaintext length
    /// ([`Unsealer::chunk_span`]).
    ///
    /// This is the building block of streaming: chunks are independent AEAD messages, so
    /// a caller may open them in any order, on several threads, into buffers it reuses
    /// from query to query, or into a small buffer it computes from and wipes. It reads
    /// the ciphertext once and decrypts it out of place into `out`: no copy. Fails, naming the layer and
    /// the chunk, if the chunk does not authenticate at this position (`out` is then
    /// zeroized) or if a length is wrong.
    pub fn open_chunk_into(
        &self,
        layer: usize,
        chunk: u64,
        sealed_chunk: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        let sealed_len = out.len().checked_add(TAG_LEN);
        let opened = match self.chunk_position(layer, chunk, out.len())? {
            Some(at) if sealed_len == Some(sealed_chunk.len()) => {
                self.key.open_into(at, sealed_chunk, out)
            }
            _ => {
                zeroize::Zeroize::zeroize(out);
                Err(())
            }
        };
        opened.map_err(|()| self.chunk_failed(layer, chunk))
    }

    /// Decrypts chunk `chunk` of layer `layer` in place: `buf` holds its ciphertext,
    /// exactly the chunk's plaintext length ([`Unsealer::chunk_span`]), and `tag` the
    /// tag that followed it. For a caller that read the ciphertext straight into the
    /// buffer the plaintext belongs in, holding no second copy of the layer. Fails as
    /// [`Unsealer::open_chunk_into`] (`buf` is then zeroized).
    pub fn open_chunk_in_place(
        &self,
        layer: usize,
        chunk: u64,
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Error> {
        let opened = match self.chunk_position(layer, chunk, buf.len())? {
            Some(at) => self.key.open_in_place_apart(at, buf, tag),
            None => {
                zeroize::Zeroize::zeroize(buf);
                Err(())
            }
        };
        opened.map_err(|()| self.chunk_failed(layer, chunk))
    }

    /// Where chunk `chunk` of layer `layer` stands (its AEAD nonce and data), if the layer
    /// has that chunk and its plaintext is `len` bytes. Fails only for no layer `layer`.
    fn chunk_position(
        &self,
        layer: usize,
        chunk: u64,
        len: usize,
    ) -> Result<Option<ChunkPosition>, Error> {
        self.layer_entry(layer)?;
        let n = self.header.chunk_count(layer);
        let span = self.chunk_span(layer, chunk);
        Ok(
            (chunk < n && len as u64 == span.end - span.start).then_some(ChunkPosition {
                layer: layer as u32,
                index: chunk,
                last: chunk + 1 == n,
            }),
        )
    }

    /// The error for chunk `chunk` of layer `layer` not opening.
    fn chunk_failed(&self, layer: usize, chunk: u64) -> Error {
        Error::ChunkFailed {
            layer: self.header.layers[layer].name.clone(),
            chunk,
        }
    }

    /// Splits a layer's plaintext into its tensors (capsule-v1 §4.3).
    pub fn layer_tensors(&self, layer: usize, plaintext: &[u8]) -> Vec<NamedTensor> {
        self.header
            .tensors
            .iter()
            .filter(|t| t.layer == layer)
            .map(|t| {
                let start = t.offset as usize;
                let len = 4 * t.shape.iter().product::<usize>();
                let values = plaintext[start..start + len]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")))
                    .collect();
                (t.name.clone(), t.shape.clone(), values)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LayerPlaintext, Policy, SealRequest};

    fn sealed(key: &ModelKey) -> Vec<u8> {
        sealed_with(key, &[1.0, 2.0, 3.0, 4.0])
    }

    /// One layer, `dense`, of one tensor `w` holding `weights`, in the smallest chunks.
    fn sealed_with(key: &ModelKey, weights: &[f32]) -> Vec<u8> {
        let request = SealRequest {
            architecture: serde_json::json!({"nodes": []}),
            preprocessing: None,
            labels: None,
            detector: None,
            policy: Policy::default(),
            chunk_size: crate::MIN_CHUNK_SIZE,
            aead: crate::Aead::SEAL_DEFAULT,
            layers: vec![LayerPlaintext {
                name: "dense".into(),
                tensors: vec![("w".into(), vec![weights.len()], weights)],
            }],
        };
        crate::seal(&request, key, crate::new_capsule_id(), &mut |_| {}).unwrap()
    }

    /// A chunk opens to the same bytes in place (its ciphertext in the buffer, its tag
    /// apart) as out of place, and fails the same way: tampered, at another position,
    /// or with the wrong length, leaving the buffer zeroed.
    #[test]
    fn a_chunk_opens_in_place_as_out_of_place() {
        let key = ModelKey::generate();
        let weights: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        let bytes = sealed_with(&key, &weights);
        let capsule = Capsule::parse(&bytes).unwrap();
        let unsealer = capsule.unseal(&key).unwrap();
        let stream = capsule.sealed_layer(0);
        let count = unsealer.header().chunk_count(0);
        assert!(count >= 3);
        let split = |chunk: u64| {
            let sealed = unsealer.sealed_chunk(0, stream, chunk).unwrap();
            let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
            (ciphertext.to_vec(), <[u8; TAG_LEN]>::try_from(tag).unwrap())
        };
        for chunk in 0..count {
            let sealed = unsealer.sealed_chunk(0, stream, chunk).unwrap();
            let mut apart = vec![0u8; sealed.len() - TAG_LEN];
            unsealer
                .open_chunk_into(0, chunk, sealed, &mut apart)
                .unwrap();
            let (mut buf, tag) = split(chunk);
            unsealer
                .open_chunk_in_place(0, chunk, &mut buf, &tag)
                .unwrap();
            assert_eq!(buf, apart);
        }
        let failed = |e: Result<(), Error>| {
            assert!(
                matches!(&e, Err(Error::ChunkFailed { layer, chunk: 1 }) if layer == "dense"),
                "{e:?}"
            )
        };
        let (mut buf, tag) = split(1);
        buf[7] ^= 1;
        failed(unsealer.open_chunk_in_place(0, 1, &mut buf, &tag));
        assert!(buf.iter().all(|&b| b == 0));
        let (mut buf, mut tag) = split(1);
        tag[0] ^= 1;
        failed(unsealer.open_chunk_in_place(0, 1, &mut buf, &tag));
        // Chunk 0's bytes (as long as chunk 1's) at chunk 1's position.
        let (mut buf, tag) = split(0);
        assert_eq!(buf.len(), split(1).0.len());
        failed(unsealer.open_chunk_in_place(0, 1, &mut buf, &tag));
        let (mut buf, tag) = split(1);
        buf.pop();
        failed(unsealer.open_chunk_in_place(0, 1, &mut buf, &tag));
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn prefix_opens_without_the_payload_and_only_unmodified() {
        let key = ModelKey::generate();
        let bytes = sealed(&key);
        let capsule = Capsule::parse(&bytes).unwrap();
        let prefix = capsule.prefix();
        assert!(prefix.len() < bytes.len());

        let unsealer = Unsealer::open_prefix(prefix, &key).unwrap();
        assert_eq!(unsealer.header(), capsule.header());
        let layer = unsealer.open_layer(0, capsule.sealed_layer(0)).unwrap();
        assert_eq!(unsealer.layer_tensors(0, &layer)[0].2, [1.0, 2.0, 3.0, 4.0]);

        assert_eq!(
            Unsealer::open_prefix(prefix, &ModelKey::generate()).err(),
            Some(Error::WrongKey)
        );
        let mut modified = prefix.to_vec();
        let at = modified.len() - MAC_LEN - 2; // inside the header JSON
        modified[at] ^= 0x01;
        assert!(Unsealer::open_prefix(&modified, &key).is_err());
        let mut bad_mac = prefix.to_vec();
        *bad_mac.last_mut().unwrap() ^= 0x01;
        assert_eq!(
            Unsealer::open_prefix(&bad_mac, &key).err(),
            Some(Error::HeaderModified)
        );
        assert!(matches!(
            Unsealer::open_prefix(&bytes, &key),
            Err(Error::TrailingData { .. })
        ));
        assert!(matches!(
            Unsealer::open_prefix(&prefix[..prefix.len() - 1], &key),
            Err(Error::Truncated { .. })
        ));
    }
}
