//! MNIST and Fashion-MNIST from their IDX files (LeCun's format), plain or gzipped: a
//! missing `name` is read from `name.gz` (Debian's `dataset-fashion-mnist` ships those in
//! `/usr/share/datasets/fashion-mnist/`).
//!
//! An IDX file is a big-endian header (two zero bytes, a type byte, the number of
//! dimensions, then one `u32` per dimension) followed by the values. Images are IDX3 of
//! `u8`, labels IDX1 of `u8`. Pixels are scaled to [0, 1], the input range of every model the
//! lab trains and exports: a capsule made from them takes `pixel / 255`.

use std::path::{Path, PathBuf};

use crate::Error;

/// The four file names, as the MNIST and Fashion-MNIST distributions spell them.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Training labels.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Test images.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Test labels.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// Number of classes of MNIST and Fashion-MNIST.
pub const CLASSES: usize = 10;

/// Labelled grey-scale images, pixels in [0, 1], row-major, one image after the other.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `len() * rows * cols` values in [0, 1].
    pub pixels: Vec<f32>,
    /// One label in `0..CLASSES` per image.
    pub labels: Vec<u8>,
}

/// A training and a test split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The training split (60,000 images for MNIST).
    pub train: Images,
    /// The test split (10,000 images).
    pub test: Images,
}

impl Images {
    /// Number of images.
    #[must_use]
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image.
    #[must_use]
    pub fn dim(&self) -> usize {
        self.rows * self.cols
    }

    /// Image `i`'s pixels.
    #[must_use]
    pub fn image(&self, i: usize) -> &[f32] {
        &self.pixels[i * self.dim()..(i + 1) * self.dim()]
    }

    /// The images at `indices`, in that order.
    ///
    /// Errors: [`Error::InvalidData`] for an index out of range.
    pub fn select(&self, indices: &[usize]) -> Result<Images, Error> {
        let mut pixels = Vec::with_capacity(indices.len() * self.dim());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::InvalidData {
                    reason: format!("image {i} asked for, only {} exist", self.len()),
                });
            }
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Ok(Images {
            rows: self.rows,
            cols: self.cols,
            pixels,
            labels,
        })
    }

    /// The first `n` images (all of them if there are fewer).
    #[must_use]
    pub fn head(&self, n: usize) -> Images {
        let n = n.min(self.len());
        Images {
            rows: self.rows,
            cols: self.cols,
            pixels: self.pixels[..n * self.dim()].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// Images `start..end`.
    #[must_use]
    pub fn range(&self, start: usize, end: usize) -> Images {
        let end = end.min(self.len());
        let start = start.min(end);
        Images {
            rows: self.rows,
            cols: self.cols,
            pixels: self.pixels[start * self.dim()..end * self.dim()].to_vec(),
            labels: self.labels[start..end].to_vec(),
        }
    }

    /// Share of each class among the labels (the class prior T of the noising defense).
    #[must_use]
    pub fn class_prior(&self) -> Vec<f64> {
        let mut counts = vec![0usize; CLASSES];
        for &l in &self.labels {
            counts[usize::from(l) % CLASSES] += 1;
        }
        let n = self.len().max(1) as f64;
        counts.into_iter().map(|c| c as f64 / n).collect()
    }

    /// Labels as `u32`, the dtype candle's losses take.
    #[must_use]
    pub fn labels_u32(&self) -> Vec<u32> {
        self.labels.iter().map(|&l| u32::from(l)).collect()
    }
}

impl Dataset {
    /// Reads the four IDX files from `dir`.
    ///
    /// Errors: [`Error::Io`] when a file is missing or unreadable, [`Error::InvalidIdx`] when
    /// one is malformed, [`Error::InvalidData`] when images and labels disagree.
    pub fn load(dir: &Path) -> Result<Dataset, Error> {
        let split = |images: &str, labels: &str| -> Result<Images, Error> {
            let (rows, cols, raw) = read_images(&dir.join(images))?;
            let labels = read_labels(&dir.join(labels))?;
            if labels.len() * rows * cols != raw.len() {
                return Err(Error::InvalidData {
                    reason: format!(
                        "{images} holds {} images but its label file {} labels",
                        raw.len() / (rows * cols).max(1),
                        labels.len()
                    ),
                });
            }
            if let Some(&bad) = labels.iter().find(|&&l| usize::from(l) >= CLASSES) {
                return Err(Error::InvalidData {
                    reason: format!("label {bad} is not below {CLASSES}"),
                });
            }
            Ok(Images {
                rows,
                cols,
                pixels: raw.into_iter().map(|p| f32::from(p) / 255.0).collect(),
                labels,
            })
        };
        Ok(Dataset {
            train: split(TRAIN_IMAGES, TRAIN_LABELS)?,
            test: split(TEST_IMAGES, TEST_LABELS)?,
        })
    }
}

/// The file's bytes; `path.gz`, decompressed, when `path` itself does not exist.
fn read(path: &Path) -> Result<Vec<u8>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut gz = path.as_os_str().to_owned();
    gz.push(".gz");
    let gz = PathBuf::from(gz);
    if !path.exists() && gz.exists() {
        let file = std::fs::File::open(&gz).map_err(io)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut bytes)
            .map_err(io)?;
        return Ok(bytes);
    }
    std::fs::read(path).map_err(io)
}

/// Parses an IDX header of `u8` values with `rank` dimensions; returns the dimensions and the
/// offset of the data.
fn parse_header(path: &Path, bytes: &[u8], rank: u8) -> Result<(Vec<usize>, usize), Error> {
    let invalid = |reason: String| Error::InvalidIdx {
        path: PathBuf::from(path),
        reason,
    };
    if bytes.len() < 4 {
        return Err(invalid("shorter than its 4-byte magic".into()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(invalid(
            "the magic does not start with two zero bytes (a .gz file? gunzip it first)".into(),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(invalid(format!(
            "value type 0x{:02x}, expected 0x08 (u8)",
            bytes[2]
        )));
    }
    if bytes[3] != rank {
        return Err(invalid(format!("{} dimensions, expected {rank}", bytes[3])));
    }
    let header = 4 + 4 * usize::from(rank);
    if bytes.len() < header {
        return Err(invalid("truncated header".into()));
    }
    let dims: Vec<usize> = (0..usize::from(rank))
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| invalid("dimensions overflow".into()))?;
    if bytes.len() != header + count {
        return Err(invalid(format!(
            "{} data bytes, the header says {count}",
            bytes.len() - header
        )));
    }
    Ok((dims, header))
}

/// Reads an IDX3 image file: (rows, cols, pixels).
pub fn read_images(path: &Path) -> Result<(usize, usize, Vec<u8>), Error> {
    let bytes = read(path)?;
    let (dims, offset) = parse_header(path, &bytes, 3)?;
    Ok((dims[1], dims[2], bytes[offset..].to_vec()))
}

/// Reads an IDX1 label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = read(path)?;
    let (_, offset) = parse_header(path, &bytes, 1)?;
    Ok(bytes[offset..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(rank: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, rank];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("x");
        let ok = idx(3, &[2, 1, 2], &[0, 255, 1, 2]);
        let (dims, off) = parse_header(p, &ok, 3).unwrap();
        assert_eq!((dims, off), (vec![2, 1, 2], 16));
        assert!(parse_header(p, &ok[..15], 3).is_err());
        assert!(parse_header(p, &idx(3, &[2, 1, 2], &[0, 1, 2]), 3).is_err());
        assert!(parse_header(p, &idx(1, &[3], &[0, 1, 2]), 3).is_err());
        assert!(parse_header(p, &[0x1f, 0x8b, 8, 0], 3).is_err());
        assert!(parse_header(p, &idx(3, &[u32::MAX, u32::MAX, 2], &[]), 3).is_err());
    }

    #[test]
    fn loads_a_written_dataset() {
        let dir = std::env::temp_dir().join(format!("capsule-lab-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (img, lab) in [(TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)] {
            std::fs::write(dir.join(img), idx(3, &[2, 1, 2], &[0, 255, 51, 0])).unwrap();
            std::fs::write(dir.join(lab), idx(1, &[2], &[3, 9])).unwrap();
        }
        let d = Dataset::load(&dir).unwrap();
        assert_eq!(d.train.len(), 2);
        assert_eq!(d.train.image(0), &[0.0, 1.0]);
        assert!((d.test.image(1)[0] - 0.2).abs() < 1e-6);
        assert_eq!(d.test.class_prior()[3], 0.5);
        assert_eq!(d.train.select(&[1]).unwrap().labels, vec![9]);
        assert!(d.train.select(&[2]).is_err());
        // A gzipped file stands in for a missing plain one.
        std::fs::remove_file(dir.join(TRAIN_LABELS)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &idx(1, &[2], &[4, 5])).unwrap();
        std::fs::write(dir.join(format!("{TRAIN_LABELS}.gz")), gz.finish().unwrap()).unwrap();
        assert_eq!(Dataset::load(&dir).unwrap().train.labels, vec![4, 5]);
        std::fs::write(dir.join(TEST_LABELS), idx(1, &[1], &[3])).unwrap();
        assert!(matches!(
            Dataset::load(&dir),
            Err(Error::InvalidData { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
