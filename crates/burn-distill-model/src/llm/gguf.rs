//! A reader for GGUF, llama.cpp's model format: header, metadata, tensor table, alignment,
//! memory-mapped tensor data, and dequantisation to f32.
//!
//! Layout (little-endian): `"GGUF"`, version (`u32`, 2 or 3), tensor count and metadata count
//! (`u64`), the metadata (key string, value type, value), the tensor table (name, rank, dims
//! innermost first, type, offset into the data section), padding to `general.alignment`
//! (default 32), then the data section. Every length and offset read from the file is checked
//! against the file's size before it is used, so a damaged file is an error, never an
//! allocation sized by a lie or a read past the end.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::llm::error::{LlmError, LlmResult};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// The tensor types [`GgufFile::dequantize`] reads.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

/// Whether [`GgufFile::dequantize`] reads tensors of type `dtype`.
pub fn is_supported(dtype: GgmlType) -> bool {
    matches!(
        dtype,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1
    )
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float32`.
    F32(f32),
    /// `float64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, for any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, for either float type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(values) => Some(values),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F32(_) => "float32",
            GgufValue::F64(_) => "float64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

/// A tensor storage type (ggml's `ggml_type`), with its block size and bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// `F32`.
    pub const F32: GgmlType = GgmlType(0);
    /// `F16`.
    pub const F16: GgmlType = GgmlType(1);
    /// `Q4_0`: blocks of 32, an f16 scale, 4-bit values offset by 8.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// `Q4_1`: blocks of 32, an f16 scale and an f16 minimum, 4-bit values.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// `Q8_0`: blocks of 32, an f16 scale, 8-bit values.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// `BF16`.
    pub const BF16: GgmlType = GgmlType(30);

    /// ggml's name of the type.
    pub fn name(self) -> String {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        NAMES
            .get(self.0 as usize)
            .map_or_else(|| format!("type {}", self.0), |name| (*name).to_string())
    }

    /// `(elements per block, bytes per block)`, for the types whose layout this reader knows
    /// (enough to bound-check a tensor it cannot dequantise).
    pub fn block_layout(self) -> Option<(u64, u64)> {
        Some(match self.0 {
            0 => (1, 4),
            1 | 30 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 | 28 => (1, 8),
            _ => return None,
        })
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as GGUF stores them: innermost (contiguous) first. A PyTorch `[out, in]`
    /// weight is `[in, out]` here.
    pub dims: Vec<u64>,
    /// Storage type.
    pub dtype: GgmlType,
    /// Offset of the data from the start of the file.
    pub offset: u64,
    /// Bytes of data, where the type's layout is known.
    pub size: Option<u64>,
}

impl GgufTensorInfo {
    /// The number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major (PyTorch) order: outermost first.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file: metadata and tensor table parsed, data memory-mapped.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: BTreeMap<String, usize>,
}

impl GgufFile {
    /// Opens and checks `path`: header, every metadata value, the tensor table, and that every
    /// tensor's data lies inside the file. No tensor data is read yet.
    ///
    /// # Errors
    /// [`LlmError::Io`] for a missing or unreadable file; [`LlmError::BadMagic`],
    /// [`LlmError::UnsupportedVersion`], [`LlmError::Truncated`] and [`LlmError::Invalid`] for a
    /// damaged one, each naming the field.
    pub fn open(path: impl AsRef<Path>) -> LlmResult<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| LlmError::io(path, e))?;
        // The map is read-only; a file truncated by someone else while mapped is the usual
        // memory-map caveat, the same as for the teacher cache.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| LlmError::io(path, e))?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> LlmResult<Self> {
        let mut reader = Reader {
            path,
            bytes: &map,
            at: 0,
        };
        let magic = reader.take(4, "the magic bytes")?;
        if magic != MAGIC {
            return Err(LlmError::BadMagic {
                path: path.to_path_buf(),
                found: magic.to_vec(),
            });
        }
        let version = reader.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(LlmError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let tensor_count = reader.u64("the tensor count")?;
        let metadata_count = reader.u64("the metadata count")?;
        // A metadata entry takes at least 13 bytes (key length, type, a one-byte value), a tensor
        // entry at least 32 (name length, rank, one dim, type, offset): a count larger than the
        // file allows is a lie, refused before anything is allocated from it.
        reader.check_count(metadata_count, 13, "the metadata count")?;
        reader.check_count(tensor_count, 32, "the tensor count")?;
        let mut metadata = BTreeMap::new();
        for index in 0..metadata_count {
            let key = reader.string(&format!("metadata key {index}"))?;
            let kind = reader.u32(&format!("the type of metadata {key:?}"))?;
            let value = reader.value(kind, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(value) => match value.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(LlmError::invalid(
                        path,
                        "general.alignment",
                        format!("{value:?} is not a power of two"),
                    ));
                }
            },
        };
        let mut tensors = Vec::with_capacity(tensor_count.min(1 << 16) as usize);
        for index in 0..tensor_count {
            let name = reader.string(&format!("the name of tensor {index}"))?;
            let rank = reader.u32(&format!("the rank of tensor {name:?}"))?;
            if rank == 0 || rank > 4 {
                return Err(LlmError::invalid(
                    path,
                    &name,
                    format!("rank {rank} (GGUF tensors have 1 to 4 dims)"),
                ));
            }
            let mut dims = Vec::with_capacity(rank as usize);
            for _ in 0..rank {
                dims.push(reader.u64(&format!("the dims of tensor {name:?}"))?);
            }
            let dtype = GgmlType(reader.u32(&format!("the type of tensor {name:?}"))?);
            let offset = reader.u64(&format!("the offset of tensor {name:?}"))?;
            if offset % alignment != 0 {
                return Err(LlmError::invalid(
                    path,
                    &name,
                    format!("data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            tensors.push((name, dims, dtype, offset));
        }
        let data_start = reader.at.div_ceil(alignment) * alignment;
        let len = map.len() as u64;
        let mut infos = Vec::with_capacity(tensors.len());
        let mut by_name = BTreeMap::new();
        for (name, dims, dtype, relative) in tensors {
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let Some(elements) = elements.filter(|&e| e > 0) else {
                return Err(LlmError::invalid(
                    path,
                    &name,
                    format!("dims {dims:?} are empty or overflow"),
                ));
            };
            let size = match dtype.block_layout() {
                Some((block, bytes)) => {
                    if dims[0] % block != 0 {
                        return Err(LlmError::invalid(
                            path,
                            &name,
                            format!(
                                "{} stores blocks of {block} values, the innermost dim is {}",
                                dtype.name(),
                                dims[0]
                            ),
                        ));
                    }
                    let size = (elements / block).checked_mul(bytes).ok_or_else(|| {
                        LlmError::invalid(path, &name, format!("dims {dims:?} overflow the file offsets"))
                    })?;
                    Some(size)
                }
                None => None,
            };
            let Some(offset) = data_start.checked_add(relative) else {
                return Err(LlmError::invalid(
                    path,
                    &name,
                    format!("data offset {relative} overflows"),
                ));
            };
            let end = offset.saturating_add(size.unwrap_or(1));
            if end > len {
                return Err(LlmError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("the data of tensor {name:?}"),
                    start: offset,
                    end,
                    len,
                });
            }
            if by_name.insert(name.clone(), infos.len()).is_some() {
                return Err(LlmError::invalid(
                    path,
                    &name,
                    "the tensor table names this tensor twice",
                ));
            }
            infos.push(GgufTensorInfo {
                name,
                dims,
                dtype,
                offset,
                size,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors: infos,
            by_name,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata entry, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The metadata value under `key`, or [`LlmError::MissingKey`].
    pub fn get(&self, key: &str) -> LlmResult<&GgufValue> {
        self.metadata.get(key).ok_or_else(|| LlmError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> LlmResult<&str> {
        let value = self.get(key)?;
        value.as_str().ok_or_else(|| self.wrong_type(key, "a string", value))
    }

    /// A required non-negative integer.
    pub fn get_u64(&self, key: &str) -> LlmResult<u64> {
        let value = self.get(key)?;
        value
            .as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", value))
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> LlmResult<f64> {
        let value = self.get(key)?;
        value.as_f64().ok_or_else(|| self.wrong_type(key, "a float", value))
    }

    /// A required array of strings.
    pub fn get_strings(&self, key: &str) -> LlmResult<Vec<&str>> {
        let value = self.get(key)?;
        let array = value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array", value))?;
        array
            .iter()
            .map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "an array of strings", v)))
            .collect()
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &GgufValue) -> LlmError {
        LlmError::invalid(
            &self.path,
            key,
            format!("expected {expected}, found {}", found.type_name()),
        )
    }

    /// The raw bytes of a tensor's data.
    ///
    /// # Errors
    /// [`LlmError::UnsupportedTensorType`] when the type's layout is unknown.
    pub fn raw(&self, info: &GgufTensorInfo) -> LlmResult<&[u8]> {
        let size = info.size.ok_or_else(|| self.unsupported(info))?;
        Ok(&self.map[info.offset as usize..(info.offset + size) as usize])
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> LlmError {
        LlmError::UnsupportedTensorType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            dtype: info.dtype.name(),
            supported: SUPPORTED_TYPES,
        }
    }

    /// A tensor's values as f32, in row-major order of [`GgufTensorInfo::shape`], computed as
    /// the `gguf` Python package's `dequantize` does (f32 arithmetic, `d · q + m`), so the
    /// values are bit-identical to it.
    ///
    /// # Errors
    /// [`LlmError::MissingTensor`] for an unknown name; [`LlmError::UnsupportedTensorType`]
    /// for a type outside [`SUPPORTED_TYPES`].
    pub fn dequantize(&self, name: &str) -> LlmResult<Vec<f32>> {
        let info = self.tensor(name).ok_or_else(|| LlmError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let raw = self.raw(info)?;
        // `raw` is inside the file, so the output is bounded by the file's size times 8 (Q4).
        let mut out = Vec::with_capacity(info.elements() as usize);
        match info.dtype {
            GgmlType::F32 => out.extend(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
            GgmlType::BF16 => out.extend(raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            GgmlType::Q8_0 => {
                for block in raw.chunks_exact(34) {
                    let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    out.extend(block[2..].iter().map(|&q| scale * f32::from(q as i8)));
                }
            }
            GgmlType::Q4_0 => {
                for block in raw.chunks_exact(18) {
                    let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let packed = &block[2..];
                    out.extend(packed.iter().map(|&q| scale * f32::from((q & 0x0F) as i8 - 8)));
                    out.extend(packed.iter().map(|&q| scale * f32::from((q >> 4) as i8 - 8)));
                }
            }
            GgmlType::Q4_1 => {
                for block in raw.chunks_exact(20) {
                    let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let min = f16::from_le_bytes([block[2], block[3]]).to_f32();
                    let packed = &block[4..];
                    out.extend(packed.iter().map(|&q| scale * f32::from(q & 0x0F) + min));
                    out.extend(packed.iter().map(|&q| scale * f32::from(q >> 4) + min));
                }
            }
            _ => return Err(self.unsupported(info)),
        }
        Ok(out)
    }
}

/// A bounds-checked cursor over the file's bytes.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    at: u64,
}

/// Nesting deeper than this in metadata arrays is refused (GGUF writers nest at most once).
const MAX_ARRAY_DEPTH: usize = 4;

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> LlmResult<&'a [u8]> {
        let len = self.bytes.len() as u64;
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= len)
            .ok_or_else(|| LlmError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                start: self.at,
                end: self.at.saturating_add(n),
                len,
            })?;
        let slice = &self.bytes[self.at as usize..end as usize];
        self.at = end;
        Ok(slice)
    }

    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> LlmResult<()> {
        let remaining = self.bytes.len() as u64 - self.at;
        if count.saturating_mul(min_bytes) > remaining {
            return Err(LlmError::invalid(
                self.path,
                what,
                format!("{count} entries cannot fit in the {remaining} bytes left in the file"),
            ));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> LlmResult<[u8; N]> {
        let bytes = self.take(N as u64, what)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> LlmResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> LlmResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> LlmResult<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| LlmError::invalid(self.path, what, format!("not UTF-8 ({e})")))
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> LlmResult<GgufValue> {
        let what = || format!("the value of metadata {key:?}");
        Ok(match kind {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(&what())?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what())?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                other => return Err(LlmError::invalid(self.path, key, format!("bool byte {other} (0 or 1)"))),
            },
            8 => GgufValue::String(self.string(&what())?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(LlmError::invalid(self.path, key, "arrays nested too deep"));
                }
                let element = self.u32(&what())?;
                let count = self.u64(&what())?;
                // Each element takes at least its type's smallest encoding, so a count the rest
                // of the file cannot hold is refused before any allocation; the reservation is
                // capped as well, as a value takes more memory than its bytes.
                let smallest = match element {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(LlmError::invalid(
                            self.path,
                            key,
                            format!("unknown array element type {other}"),
                        ));
                    }
                };
                self.check_count(count, smallest, key)?;
                let mut values = Vec::with_capacity(count.min(1 << 16) as usize);
                for _ in 0..count {
                    values.push(self.value(element, key, depth + 1)?);
                }
                GgufValue::Array(values)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what())?)),
            other => return Err(LlmError::invalid(self.path, key, format!("unknown value type {other}"))),
        })
    }
}
