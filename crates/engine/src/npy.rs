//! NumPy `.npy` files: the format test vectors and tensors on disk use.
//!
//! Implements the format as specified in numpy's
//! `numpy/lib/format.py` ("The .npy format"):
//!
//! ```text
//! "\x93NUMPY" major minor  header_len  header                       data
//!  6 bytes    1     1      u16 LE (1.0), u32 LE (2.0, 3.0)
//! ```
//!
//! The header is a Python dict literal with exactly the keys `descr`,
//! `fortran_order` and `shape`, padded with spaces and ended by `\n` so
//! that the data starts at a multiple of 64 bytes (16 for older writers:
//! any padding is accepted when reading). Version 3.0 only allows UTF-8 in
//! the header, which the parser below never needs.
//!
//! [`read_npy`] takes little-endian `f4`, `f8`, `i8`, `i4` and `u1` arrays
//! in C order and converts them to `f32`; it rejects Fortran order,
//! big-endian data, other types, and bytes after the data. [`write_npy`]
//! writes version 1.0, `<f4`, C order, as `numpy.save` does.

use crate::error::Error;
use crate::tensor::{Tensor, volume};

/// The magic string every `.npy` file starts with.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The data's alignment in files `numpy.save` writes.
const ALIGNMENT: usize = 64;

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidNpy {
        reason: reason.into(),
    }
}

/// Parses a `.npy` file into an `f32` tensor.
///
/// Fails with [`Error::InvalidNpy`] on anything but a well-formed file in
/// a supported layout (see the module documentation); never panics.
pub fn read_npy(bytes: &[u8]) -> Result<Tensor, Error> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| invalid("not a .npy file (the magic string is missing)"))?;
    let (&[major, minor], rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| invalid("truncated before the version"))?;
    let (header_len, rest) = match major {
        1 => rest
            .split_first_chunk::<2>()
            .map(|(n, r)| (usize::from(u16::from_le_bytes(*n)), r)),
        2 | 3 => rest
            .split_first_chunk::<4>()
            .and_then(|(n, r)| Some((usize::try_from(u32::from_le_bytes(*n)).ok()?, r))),
        _ => {
            return Err(invalid(format!(
                "format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"
            )));
        }
    }
    .ok_or_else(|| invalid("truncated before the header length"))?;
    if header_len > rest.len() {
        return Err(invalid(format!(
            "the header claims {header_len} bytes but only {} follow",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(header_len);
    let header = Header::parse(header)?;

    let len = volume(&header.shape)
        .ok_or_else(|| invalid(format!("shape {:?} is too large", header.shape)))?;
    let expected = len
        .checked_mul(header.dtype.size())
        .ok_or_else(|| invalid(format!("shape {:?} is too large", header.shape)))?;
    if data.len() != expected {
        return Err(invalid(format!(
            "shape {:?} of {} needs {expected} data bytes, the file has {}",
            header.shape,
            header.dtype.descr(),
            data.len()
        )));
    }
    let values = header.dtype.decode(data);
    Tensor::new(header.shape, values).map_err(|e| invalid(e.to_string()))
}

/// Serialises `t` as a version 1.0 `.npy` file of `<f4` values in C order.
#[must_use]
pub fn write_npy(t: &Tensor) -> Vec<u8> {
    let shape = match t.shape() {
        [d] => format!("({d},)"),
        dims => {
            let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
            format!("({})", dims.join(", "))
        }
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Version 1.0 stores the header length in a u16; an absurdly high rank
    // needs 2.0, as numpy itself decides.
    let version_1 = MAGIC.len() + 2 + 2 + header.len() < usize::from(u16::MAX);
    let preamble = MAGIC.len() + 2 + if version_1 { 2 } else { 4 };
    let padded = (preamble + header.len() + 1).next_multiple_of(ALIGNMENT);
    let spaces = padded - preamble - header.len() - 1;
    header.extend(std::iter::repeat_n(' ', spaces));
    header.push('\n');

    let mut out = Vec::with_capacity(padded + 4 * t.len());
    out.extend_from_slice(MAGIC);
    if version_1 {
        out.extend_from_slice(&[1, 0]);
        let len = u16::try_from(header.len()).expect("checked against u16::MAX above");
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        let len = u32::try_from(header.len()).expect("a header of one line per dimension");
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    for v in t.data() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The element types [`read_npy`] converts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    I64,
    I32,
    U8,
}

impl Dtype {
    fn from_descr(descr: &str) -> Result<Dtype, Error> {
        Ok(match descr {
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            "<i8" => Dtype::I64,
            "<i4" => Dtype::I32,
            "|u1" | "<u1" | "u1" => Dtype::U8,
            d if d.starts_with('>') => {
                return Err(invalid(format!(
                    "big-endian data ('{d}') is not supported; save it as little-endian"
                )));
            }
            d => {
                return Err(invalid(format!(
                    "dtype '{d}' is not supported (use <f4, <f8, <i8, <i4 or |u1)"
                )));
            }
        })
    }

    fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::F64 => "<f8",
            Dtype::I64 => "<i8",
            Dtype::I32 => "<i4",
            Dtype::U8 => "|u1",
        }
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::U8 => 1,
        }
    }

    /// Converts little-endian values to `f32` (rounding to nearest, as a
    /// numpy `astype(np.float32)` does). `data.len()` is a multiple of the size.
    fn decode(self, data: &[u8]) -> Vec<f32> {
        fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
            data.chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
                .collect()
        }
        match self {
            Dtype::F32 => each(data, f32::from_le_bytes),
            Dtype::F64 => each(data, |b| f64::from_le_bytes(b) as f32),
            Dtype::I64 => each(data, |b| i64::from_le_bytes(b) as f32),
            Dtype::I32 => each(data, |b| i32::from_le_bytes(b) as f32),
            Dtype::U8 => data.iter().map(|&b| f32::from(b)).collect(),
        }
    }
}

/// The parsed header dict.
#[derive(Debug)]
struct Header {
    dtype: Dtype,
    shape: Vec<usize>,
}

/// A value in the header dict.
#[derive(Debug)]
enum Literal {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

impl Header {
    /// Parses `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`
    /// followed by padding; keys in any order, with either quote.
    fn parse(bytes: &[u8]) -> Result<Header, Error> {
        let mut p = Parser { bytes, pos: 0 };
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        p.expect(b'{')?;
        loop {
            p.skip_space();
            if p.eat(b'}') {
                break;
            }
            let key = p.string()?;
            p.skip_space();
            p.expect(b':')?;
            p.skip_space();
            let value = p.literal()?;
            let slot = match (key.as_str(), value) {
                ("descr", Literal::Str(s)) => descr.replace(s).is_some(),
                ("fortran_order", Literal::Bool(b)) => fortran.replace(b).is_some(),
                ("shape", Literal::Tuple(t)) => shape.replace(t).is_some(),
                ("descr" | "fortran_order" | "shape", v) => {
                    return Err(invalid(format!("header key '{key}' has a bad value {v:?}")));
                }
                _ => return Err(invalid(format!("unexpected header key '{key}'"))),
            };
            if slot {
                return Err(invalid(format!("header key '{key}' appears twice")));
            }
            p.skip_space();
            if !p.eat(b',') {
                p.skip_space();
                p.expect(b'}')?;
                break;
            }
        }
        // Padding: spaces, then a newline (some writers omit it).
        if !p
            .rest()
            .iter()
            .all(|&b| b == b' ' || b == b'\n' || b == b'\t' || b == b'\r')
        {
            return Err(invalid("unexpected bytes after the header dict"));
        }
        let (Some(descr), Some(fortran), Some(shape)) = (descr, fortran, shape) else {
            return Err(invalid(
                "the header must have the keys 'descr', 'fortran_order' and 'shape'",
            ));
        };
        if fortran {
            return Err(invalid(
                "Fortran-order arrays are not supported; save a C-contiguous array",
            ));
        }
        Ok(Header {
            dtype: Dtype::from_descr(&descr)?,
            shape,
        })
    }
}

/// A cursor over the header's bytes.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn rest(&self) -> &[u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn expect(&mut self, b: u8) -> Result<(), Error> {
        if self.eat(b) {
            Ok(())
        } else {
            Err(invalid(format!(
                "malformed header: expected '{}' at byte {}",
                char::from(b),
                self.pos
            )))
        }
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn literal(&mut self) -> Result<Literal, Error> {
        match self.peek() {
            Some(b'\'' | b'"') => self.string().map(Literal::Str),
            Some(b'(') => self.tuple().map(Literal::Tuple),
            _ if self.rest().starts_with(b"True") => {
                self.pos += 4;
                Ok(Literal::Bool(true))
            }
            _ if self.rest().starts_with(b"False") => {
                self.pos += 5;
                Ok(Literal::Bool(false))
            }
            _ => Err(invalid(format!(
                "malformed header: no value at byte {}",
                self.pos
            ))),
        }
    }

    /// A quoted string without escapes (no header value needs one).
    fn string(&mut self) -> Result<String, Error> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(invalid(format!(
                    "malformed header: expected a string at byte {}",
                    self.pos
                )));
            }
        };
        self.pos += 1;
        let start = self.pos;
        let len = self
            .rest()
            .iter()
            .position(|&b| b == quote)
            .ok_or_else(|| invalid("malformed header: unterminated string"))?;
        self.pos += len + 1;
        let text = &self.bytes[start..start + len];
        if text.contains(&b'\\') {
            return Err(invalid(
                "malformed header: escapes in strings are not supported",
            ));
        }
        String::from_utf8(text.to_vec())
            .map_err(|_| invalid("malformed header: a string is not UTF-8"))
    }

    /// `()`, `(3,)`, `(2, 3)`, `(2, 3,)`.
    fn tuple(&mut self) -> Result<Vec<usize>, Error> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_space();
            if self.eat(b')') {
                break;
            }
            dims.push(self.integer()?);
            self.skip_space();
            if !self.eat(b',') {
                self.skip_space();
                self.expect(b')')?;
                break;
            }
        }
        // Python writes a 1-tuple as `(3,)`; `(3)` is just 3, not a shape.
        Ok(dims)
    }

    fn integer(&mut self) -> Result<usize, Error> {
        let digits = self
            .rest()
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            return Err(invalid(format!(
                "malformed header: expected a dimension at byte {}",
                self.pos
            )));
        }
        let text = &self.bytes[self.pos..self.pos + digits];
        self.pos += digits;
        // Only ASCII digits: the conversion fails only on overflow.
        std::str::from_utf8(text)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("a dimension in the header is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A `.npy` file from its header dict and data, padded like numpy's.
    fn file(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
        let preamble = if version == 1 { 10 } else { 12 };
        let mut header = dict.to_string();
        while !(preamble + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version, 0]);
        if version == 1 {
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn reason(r: Result<Tensor, Error>) -> String {
        match r {
            Err(Error::InvalidNpy { reason }) => reason,
            other => panic!("expected InvalidNpy, got {other:?}"),
        }
    }

    /// Files written by numpy 2.4 (`numpy.save`, or
    /// `numpy.lib.format.write_array` for versions 2.0 and 3.0), as hex,
    /// with the array saved and the tensor it must read as.
    const NUMPY_FILES: &[(&str, &str, &[usize], &[f32])] = &[
        (
            "numpy.arange(6, dtype='<f4').reshape(2, 3)",
            "934e554d5059010076007b276465736372273a20273c6634272c2027666f7274\
72616e5f6f72646572273a2046616c73652c20277368617065273a2028322c20\
33292c207d202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
000000000000803f0000004000004040000080400000a040",
            &[2, 3],
            &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        ),
        (
            "numpy.array([-2, 7], dtype='<i8')",
            "934e554d5059010076007b276465736372273a20273c6938272c2027666f7274\
72616e5f6f72646572273a2046616c73652c20277368617065273a2028322c29\
2c207d2020202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
feffffffffffffff0700000000000000",
            &[2],
            &[-2.0, 7.0],
        ),
        (
            "numpy.array([[-3, 9]], dtype='<i4')",
            "934e554d5059010076007b276465736372273a20273c6934272c2027666f7274\
72616e5f6f72646572273a2046616c73652c20277368617065273a2028312c20\
32292c207d202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
fdffffff09000000",
            &[1, 2],
            &[-3.0, 9.0],
        ),
        (
            "numpy.array([0.1, -2.5], dtype='<f8')",
            "934e554d5059010076007b276465736372273a20273c6638272c2027666f7274\
72616e5f6f72646572273a2046616c73652c20277368617065273a2028322c29\
2c207d2020202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
9a9999999999b93f00000000000004c0",
            &[2],
            &[0.1, -2.5],
        ),
        (
            "numpy.array([0, 128, 255], dtype='u1')",
            "934e554d5059010076007b276465736372273a20277c7531272c2027666f7274\
72616e5f6f72646572273a2046616c73652c20277368617065273a2028332c29\
2c207d2020202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
0080ff",
            &[3],
            &[0.0, 128.0, 255.0],
        ),
        (
            "numpy.float32(1.5)",
            "934e554d5059010076007b276465736372273a20273c6634272c2027666f7274\
72616e5f6f72646572273a2046616c73652c20277368617065273a2028292c20\
7d20202020202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
0000c03f",
            &[],
            &[1.5],
        ),
        (
            "numpy.array([1, 2], dtype='<f4'), version (2, 0)",
            "934e554d50590200740000007b276465736372273a20273c6634272c2027666f\
727472616e5f6f72646572273a2046616c73652c20277368617065273a202832\
2c292c207d202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
0000803f00000040",
            &[2],
            &[1.0, 2.0],
        ),
        (
            "numpy.array([1, 2], dtype='<f4'), version (3, 0)",
            "934e554d50590300740000007b276465736372273a20273c6634272c2027666f\
727472616e5f6f72646572273a2046616c73652c20277368617065273a202832\
2c292c207d202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a\
0000803f00000040",
            &[2],
            &[1.0, 2.0],
        ),
    ];

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn arange_2x3() -> Vec<u8> {
        hex(NUMPY_FILES[0].1)
    }

    #[test]
    fn reads_what_numpy_writes() {
        for &(what, bytes, shape, data) in NUMPY_FILES {
            let t = read_npy(&hex(bytes)).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(t.shape(), shape, "{what}");
            assert_eq!(t.data(), data, "{what}");
        }
    }

    #[test]
    fn writes_what_numpy_writes() {
        for &(what, bytes, shape, data) in &NUMPY_FILES[..1] {
            let t = Tensor::new(shape.to_vec(), data.to_vec()).unwrap();
            assert_eq!(write_npy(&t), hex(bytes), "{what}");
        }
        let scalar = NUMPY_FILES[5];
        let t = Tensor::new(vec![], vec![1.5]).unwrap();
        assert_eq!(write_npy(&t), hex(scalar.1), "{}", scalar.0);
    }

    #[test]
    fn round_trips_any_rank() {
        for shape in [vec![], vec![0], vec![5], vec![1, 2, 3, 4], vec![2, 0, 3]] {
            let n = shape.iter().product();
            let t = Tensor::new(shape, (0..n).map(|v| v as f32 * -0.5).collect()).unwrap();
            let bytes = write_npy(&t);
            let header_end = bytes.len() - 4 * n;
            assert_eq!(
                usize::from(u16::from_le_bytes([bytes[8], bytes[9]])),
                header_end - 10
            );
            assert_eq!(header_end % 64, 0);
            assert_eq!(bytes[header_end - 1], b'\n');
            assert_eq!(read_npy(&bytes).unwrap(), t);
        }
    }

    #[test]
    fn accepts_keys_in_any_order_and_double_quotes() {
        let dict = "{\"shape\": (3,), 'fortran_order': False, 'descr': '|u1'}";
        assert_eq!(
            read_npy(&file(3, dict, &[0, 128, 255])).unwrap().data(),
            &[0.0, 128.0, 255.0]
        );
    }

    #[test]
    fn rejects_what_it_does_not_read() {
        let data = [0u8; 8];
        let with = |dict: &str| reason(read_npy(&file(1, dict, &data)));
        assert!(
            with("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }").contains("Fortran")
        );
        assert!(
            with("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }")
                .contains("big-endian")
        );
        assert!(
            with("{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }")
                .contains("'<c8' is not supported")
        );
        assert!(
            with("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }")
                .contains("needs 12 data bytes")
        );
        assert!(with("{'descr': '<f4', 'fortran_order': False}").contains("must have the keys"));
        assert!(
            with("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 'y'}")
                .contains("unexpected header key 'x'")
        );
        assert!(
            with("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}")
                .contains("twice")
        );
        assert!(
            with("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}")
                .contains("no value")
        );
        assert!(
            with("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}")
                .contains("too large")
        );
        assert!(with("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296)}").contains("too large"));

        assert!(reason(read_npy(b"PK\x03\x04")).contains("magic"));
        assert!(reason(read_npy(b"\x93NUMPY\x04\x00")).contains("version 4.0"));
        assert!(reason(read_npy(b"\x93NUMPY\x01")).contains("truncated"));
        assert!(reason(read_npy(b"\x93NUMPY\x01\x00\xff\x00{")).contains("claims 255 bytes"));
        let mut trailing = arange_2x3();
        trailing.push(0);
        assert!(reason(read_npy(&trailing)).contains("the file has 25"));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = read_npy(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = read_npy(&with_magic);
        }

        #[test]
        fn mutated_files_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = arange_2x3();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            if let Ok(t) = read_npy(&bytes) {
                prop_assert_eq!(t.len(), t.shape().iter().product::<usize>());
            }
        }

        #[test]
        fn written_files_read_back(shape in prop::collection::vec(0usize..4, 0..5), seed in any::<u32>()) {
            let n = shape.iter().product::<usize>();
            let data = (0..n as u32).map(|i| f32::from_bits(i.wrapping_mul(seed) | 1) ).map(|v| if v.is_nan() { 0.5 } else { v }).collect();
            let t = Tensor::new(shape, data).unwrap();
            prop_assert_eq!(read_npy(&write_npy(&t)).unwrap(), t);
        }
    }
}
