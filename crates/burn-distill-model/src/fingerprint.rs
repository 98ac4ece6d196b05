//! Content fingerprints: 128-bit hashes that say "same weights" or "same data" without
//! comparing them byte by byte. The teacher-output cache stores the fingerprints of the teacher
//! and dataset it was made from, and refuses to serve a different one.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Bool, Int, Tensor};
use xxhash_rust::xxh3::Xxh3;

/// A 128-bit content hash (XXH3-128), shown and stored as 32 hex digits.
///
/// It detects accidental change (other weights, other data, another order), not tampering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u128);

impl Fingerprint {
    /// The fingerprint of every parameter of `module`, in visiting order: each tensor's kind,
    /// shape and values. Two modules with equal weights have equal fingerprints on any device;
    /// one changed weight changes it. Reads every parameter back from its device once.
    pub fn of_module<M: Module>(module: &M) -> Self {
        let mut visitor = ParamHasher {
            hasher: Fingerprinter::new("module"),
        };
        module.visit(&mut visitor);
        visitor.hasher.finish()
    }

    /// The fingerprint of a byte string.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let mut hasher = Fingerprinter::new("bytes");
        hasher.update(bytes);
        hasher.finish()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 32 {
            return Err(format!("a fingerprint has 32 hex digits, got {text:?}"));
        }
        u128::from_str_radix(text, 16)
            .map(Self)
            .map_err(|_| format!("not a hex fingerprint: {text:?}"))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<De: serde::Deserializer<'de>>(deserializer: De) -> Result<Self, De::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A streaming builder of a [`Fingerprint`]; feed it the bytes that define a thing, in order.
///
/// The `domain` given to [`Fingerprinter::new`] is hashed first, so a dataset and a model with
/// the same bytes get different fingerprints.
#[derive(Clone)]
pub struct Fingerprinter {
    hasher: Xxh3,
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fingerprinter").finish_non_exhaustive()
    }
}

impl Fingerprinter {
    /// Starts a fingerprint for things of kind `domain` (e.g. `"mnist"`, `"module"`).
    pub fn new(domain: &str) -> Self {
        let mut hasher = Self { hasher: Xxh3::new() };
        hasher.update_str(domain);
        hasher
    }

    /// Adds raw bytes (length-prefixed, so `["ab", "c"]` and `["a", "bc"]` differ).
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        self.update_u64(bytes.len() as u64);
        self.hasher.update(bytes);
        self
    }

    /// Adds a string.
    pub fn update_str(&mut self, text: &str) -> &mut Self {
        self.update(text.as_bytes())
    }

    /// Adds an integer.
    pub fn update_u64(&mut self, value: u64) -> &mut Self {
        self.hasher.update(&value.to_le_bytes());
        self
    }

    /// Adds another fingerprint.
    pub fn update_fingerprint(&mut self, fingerprint: Fingerprint) -> &mut Self {
        self.hasher.update(&fingerprint.0.to_le_bytes());
        self
    }

    /// The fingerprint of everything added so far.
    pub fn finish(&self) -> Fingerprint {
        Fingerprint(self.hasher.digest128())
    }
}

struct ParamHasher {
    hasher: Fingerprinter,
}

impl ParamHasher {
    fn shape(&mut self, kind: &str, dims: &[usize]) {
        self.hasher.update_str(kind).update_u64(dims.len() as u64);
        for &dim in dims {
            self.hasher.update_u64(dim as u64);
        }
    }
}

impl ModuleVisitor for ParamHasher {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        self.shape("float", &tensor.dims());
        // Hash f32 values whatever the storage dtype, so the same weights agree across devices.
        let bytes: Vec<u8> = tensor
            .into_data()
            .iter::<f32>()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        self.hasher.update(&bytes);
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        let tensor = param.val();
        self.shape("int", &tensor.dims());
        let bytes: Vec<u8> = tensor
            .into_data()
            .iter::<i64>()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        self.hasher.update(&bytes);
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
        let tensor = param.val();
        self.shape("bool", &tensor.dims());
        let bytes: Vec<u8> = tensor.into_data().iter::<bool>().map(u8::from).collect();
        self.hasher.update(&bytes);
    }
}
