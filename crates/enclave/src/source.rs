//! What the host sends the enclave of a capsule: its prefix at `Load`, its sealed
//! layers at every `Query` (`spec/enclave-protocol.md` §5.5, §5.6).
//!
//! A [`Capsule`] holds every byte in memory. A [`CapsuleFile`] holds the prefix
//! and gives each sealed chunk as where it lies in the file ([`FileChunk`]), which
//! the host moves into the enclave's pipe as it is sent, so that running a model
//! through the enclave costs the host no more than a chunk of memory, not the
//! model's size (VGG-16: 528 MB), and no time reading the file before the enclave
//! starts.
//! Like the rest of the host, neither holds a key: the enclave authenticates
//! every byte it gets, so a file changed while it is read fails as a tampered
//! capsule does.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use capsule_format::{Capsule, CapsuleLayout, Header, TAG_LEN};

use crate::error::Error;

/// A capsule as the host streams it: header, prefix, and sealed chunks in order.
pub trait CapsuleSource {
    /// The public header (unauthenticated until the enclave checks it).
    fn header(&self) -> &Header;

    /// Version line, header length, header and MAC (capsule-v1 §3).
    fn prefix(&self) -> &[u8];

    /// Calls `send` with each sealed chunk of layer `layer` (ciphertext and tag), in
    /// order, and stops at the first error, its own or `send`'s.
    fn each_chunk(
        &self,
        layer: usize,
        send: &mut dyn FnMut(SealedChunk<'_>) -> Result<(), Error>,
    ) -> Result<(), Error>;
}

/// A sealed chunk (ciphertext and tag) as a [`CapsuleSource`] gives it.
#[derive(Debug)]
pub enum SealedChunk<'a> {
    /// Its bytes, in memory.
    Bytes(&'a [u8]),
    /// Where it lies in a capsule file, not read yet: the host moves it from the file
    /// into the enclave's pipe without copying it through its own memory where the
    /// kernel can (`splice`), and otherwise reads it ([`FileChunk::read`]).
    File(FileChunk<'a>),
}

/// `len` bytes of a [`CapsuleFile`] from byte `at`: one sealed chunk.
#[derive(Debug)]
pub struct FileChunk<'a> {
    capsule: &'a CapsuleFile,
    at: u64,
    len: usize,
    /// Where the chunk's layer ends, as the header says.
    layer_end: u64,
}

impl FileChunk<'_> {
    /// The chunk's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chunk has no bytes (never: a chunk holds at least its tag).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The open file and the chunk's offset in it.
    pub fn file(&self) -> (&File, u64) {
        (&self.capsule.file, self.at)
    }

    /// Reads the chunk into `buf` and returns it; fails as [`FileChunk::failed`] says.
    pub fn read<'b>(&self, buf: &'b mut Vec<u8>) -> Result<&'b [u8], Error> {
        buf.resize(self.len, 0);
        self.capsule
            .file
            .read_exact_at(buf, self.at)
            .map_err(|e| self.failed(e))?;
        Ok(buf)
    }

    /// The error for reading the chunk failing with `e`: one that names the file, and
    /// says it was cut while it was streamed when it ended early.
    pub fn failed(&self, e: std::io::Error) -> Error {
        Error::CapsuleFile {
            path: self.capsule.path.clone(),
            reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format!(
                    "it ended before byte {}, where its header says it ends: it changed while being read; restore it and run again",
                    self.layer_end
                )
            } else {
                format!("{e} at byte {}", self.at)
            },
        }
    }
}

/// Bytes of one sealed chunk of a capsule with this header (the last may be shorter).
fn sealed_chunk_len(header: &Header) -> usize {
    header.chunk_size as usize + TAG_LEN
}

impl CapsuleSource for Capsule<'_> {
    fn header(&self) -> &Header {
        Capsule::header(self)
    }

    fn prefix(&self) -> &[u8] {
        Capsule::prefix(self)
    }

    fn each_chunk(
        &self,
        layer: usize,
        send: &mut dyn FnMut(SealedChunk<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        // An empty layer is one empty chunk: just its tag.
        self.sealed_layer(layer)
            .chunks(sealed_chunk_len(self.header()))
            .try_for_each(|bytes| send(SealedChunk::Bytes(bytes)))
    }
}

/// A capsule file, streamed chunk by chunk from the file.
#[derive(Debug)]
pub struct CapsuleFile {
    path: PathBuf,
    file: File,
    prefix: Vec<u8>,
    layout: CapsuleLayout,
}

impl CapsuleFile {
    /// Opens the capsule at `path` and reads its prefix. Fails on a file that cannot be
    /// read, is not a capsule, or is not as long as its header says
    /// ([`Error::Format`]), as [`Capsule::parse`] does on the whole file.
    pub fn open(path: &Path) -> Result<CapsuleFile, Error> {
        let failed = |e: std::io::Error| Error::CapsuleFile {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let mut file = File::open(path).map_err(failed)?;
        let total = file.metadata().map_err(failed)?.len();
        let mut prefix = Vec::with_capacity(CapsuleLayout::START_LEN);
        (&mut file)
            .take(CapsuleLayout::START_LEN as u64)
            .read_to_end(&mut prefix)
            .map_err(failed)?;
        let prefix_len = CapsuleLayout::prefix_len(&prefix)?;
        (&mut file)
            .take((prefix_len - prefix.len()) as u64)
            .read_to_end(&mut prefix)
            .map_err(failed)?;
        let layout = CapsuleLayout::parse(&prefix, total)?;
        Ok(CapsuleFile {
            path: path.to_owned(),
            file,
            prefix,
            layout,
        })
    }
}

impl CapsuleSource for CapsuleFile {
    fn header(&self) -> &Header {
        self.layout.header()
    }

    fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    fn each_chunk(
        &self,
        layer: usize,
        send: &mut dyn FnMut(SealedChunk<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let range = self.layout.sealed_range(layer);
        let step = sealed_chunk_len(self.header()) as u64;
        let mut at = range.start;
        while at < range.end {
            let len = step.min(range.end - at);
            send(SealedChunk::File(FileChunk {
                capsule: self,
                at,
                len: len as usize,
                layer_end: range.end,
            }))?;
            at += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use capsule_format::{LayerPlaintext, ModelKey, Policy, SealRequest, seal};

    use super::*;

    /// Three layers in 64-byte chunks: several chunks each, the last ones short.
    fn sealed() -> Vec<u8> {
        let w: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
        fn layer<'v>(name: &str, values: &'v [f32]) -> LayerPlaintext<'v> {
            LayerPlaintext {
                name: name.into(),
                tensors: vec![(format!("{name}.w"), vec![values.len()], values)],
            }
        }
        let request = SealRequest {
            architecture: serde_json::json!({"nodes": []}),
            preprocessing: None,
            labels: None,
            detector: None,
            policy: Policy::default(),
            chunk_size: 64,
            aead: capsule_format::Aead::SEAL_DEFAULT,
            layers: vec![
                layer("a", &w[..37]),
                layer("b", &w[37..40]),
                layer("c", &w[40..]),
            ],
        };
        seal(
            &request,
            &ModelKey::from_bytes([3; 32]),
            [9; 16],
            &mut |_| {},
        )
        .unwrap()
    }

    fn chunks(source: &dyn CapsuleSource, layer: usize) -> Result<Vec<Vec<u8>>, Error> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        source.each_chunk(layer, &mut |chunk| {
            out.push(match chunk {
                SealedChunk::Bytes(bytes) => bytes.to_vec(),
                SealedChunk::File(chunk) => chunk.read(&mut buf)?.to_vec(),
            });
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn a_capsule_file_streams_the_chunks_of_the_capsule_in_memory() {
        let bytes = sealed();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.capsule");
        std::fs::write(&path, &bytes).unwrap();
        let file = CapsuleFile::open(&path).unwrap();
        let memory = Capsule::parse(&bytes).unwrap();
        assert_eq!(CapsuleSource::prefix(&file), memory.prefix());
        assert_eq!(file.header().capsule_id, memory.header().capsule_id);
        for layer in 0..3 {
            let (got, want) = (
                chunks(&file, layer).unwrap(),
                chunks(&memory, layer).unwrap(),
            );
            assert!(
                want.len() > 1 || layer == 1,
                "layer {layer}: {} chunks",
                want.len()
            );
            assert_eq!(got, want, "layer {layer}");
        }
    }

    #[test]
    fn a_short_file_is_refused_at_open_and_one_cut_while_streamed_is_named() {
        let bytes = sealed();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.capsule");
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = CapsuleFile::open(&path).unwrap_err();
        assert!(
            matches!(err, Error::Format(capsule_format::Error::Truncated { .. })),
            "{err:?}"
        );
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert!(matches!(
            CapsuleFile::open(&path),
            Err(Error::Format(capsule_format::Error::Truncated { .. }))
        ));
        let missing = CapsuleFile::open(&dir.path().join("gone")).unwrap_err();
        assert!(matches!(missing, Error::CapsuleFile { .. }), "{missing:?}");

        std::fs::write(&path, &bytes).unwrap();
        let file = CapsuleFile::open(&path).unwrap();
        // Cut after the prefix was read: the first layers still stream, the last fails.
        let last = file.layout.sealed_range(2);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(last.start + 10)
            .unwrap();
        assert!(chunks(&file, 0).is_ok());
        let err = chunks(&file, 2).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::CapsuleFile { .. }), "{err:?}");
        assert!(text.contains("changed while being read"), "{text}");
    }
}
