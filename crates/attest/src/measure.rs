//! The measurement of an enclave binary (`spec/attestation.md` §1.2).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::Error;

/// SHA-256 of a file's bytes: the measurement of the enclave binary at `path`.
pub fn measure_file(path: &Path) -> Result<[u8; 32], Error> {
    let mut file = File::open(path).map_err(Error::io("open for measuring", path))?;
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read for measuring", path)(e)),
        };
        digest.update(&buf[..n]);
    }
    Ok(digest
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_sha256_of_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enclave");
        // Longer than one read buffer, so the loop is exercised.
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        assert_eq!(measure_file(&path).unwrap()[..], *expected.as_ref());

        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            hex::encode(measure_file(&path).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_the_path() {
        let err = measure_file(Path::new("/nonexistent/enclave")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/enclave"), "{err}");
    }
}
