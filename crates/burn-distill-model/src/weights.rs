//! Saving and loading models, and importing teachers trained in PyTorch.

use std::path::Path;

use burn::module::Module;
use burn::store::{
    ApplyError, ApplyResult, BurnpackStore, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, SafetensorsStore,
};

use crate::error::ModelError;

/// A weight-file format, chosen from the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// burn's own format (`.bpk`).
    Burnpack,
    /// safetensors (`.safetensors`), in burn's layout (Linear weights `[in, out]`).
    Safetensors,
}

impl WeightFormat {
    /// The format for `path`'s extension.
    ///
    /// # Errors
    /// [`ModelError::WeightFile`] for an extension other than `.bpk` or `.safetensors`.
    pub fn of(path: &Path) -> crate::Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("bpk") => Ok(WeightFormat::Burnpack),
            Some("safetensors") => Ok(WeightFormat::Safetensors),
            _ => Err(file_error(
                path,
                "unknown extension: use .bpk (burnpack) or .safetensors",
            )),
        }
    }
}

/// Saves `model`'s parameters to `path` (format from the extension), atomically: the file is
/// written under a temporary name and renamed, so an interrupted save never leaves a truncated
/// file where a good one was.
///
/// # Errors
/// [`ModelError::WeightFile`] for an unknown extension or an I/O failure.
pub fn save_weights<M: Module>(model: &M, path: impl AsRef<Path>) -> crate::Result<()> {
    let path = path.as_ref();
    let format = WeightFormat::of(path)?;
    crate::files::save_atomically(
        path,
        |temporary| {
            let written = match format {
                WeightFormat::Burnpack => {
                    let mut store = BurnpackStore::from_file(temporary)
                        .auto_extension(false)
                        .overwrite(true);
                    model.save_into(&mut store).map_err(|e| e.to_string())
                }
                WeightFormat::Safetensors => {
                    let mut store = SafetensorsStore::from_file(temporary).overwrite(true);
                    model.save_into(&mut store).map_err(|e| e.to_string())
                }
            };
            written.map_err(|reason| file_error(path, &reason))
        },
        |error| file_error(path, &error.to_string()),
    )
}

/// Loads parameters saved by [`save_weights`] into `model` (which gives the architecture).
///
/// # Errors
/// [`ModelError::WeightShape`] naming the tensor and both shapes when one does not fit,
/// [`ModelError::MissingWeights`] when the file lacks some of the model's tensors, and
/// [`ModelError::WeightFile`] for a file that cannot be read.
pub fn load_weights<M: Module>(model: M, path: impl AsRef<Path>) -> crate::Result<M> {
    let path = path.as_ref();
    match WeightFormat::of(path)? {
        WeightFormat::Burnpack => {
            let store = BurnpackStore::from_file(path)
                .auto_extension(false)
                .validate(false)
                .allow_partial(true);
            apply(model, path, store)
        }
        WeightFormat::Safetensors => {
            let store = SafetensorsStore::from_file(path).validate(false).allow_partial(true);
            apply(model, path, store)
        }
    }
}

/// Loads a PyTorch model's `.safetensors` weights (saved with `safetensors.torch.save_file(
/// model.state_dict(), path)`) into `model`.
///
/// PyTorch stores a `Linear` weight as `[out, in]` and burn as `[in, out]`; the import
/// transposes them (burn-store's `PyTorchToBurnAdapter`). Keys are the state-dict names with
/// `key_remapping` applied in order, each a `(regex, replacement)` pair. For the reference
/// models the mapping is:
///
/// | PyTorch module | state-dict key | burn key |
/// |---|---|---|
/// | `self.hidden = nn.ModuleList([nn.Linear, …])` | `hidden.{i}.weight`, `hidden.{i}.bias` | same |
/// | `self.output = nn.Linear` | `output.weight`, `output.bias` | same |
/// | `nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)` | `0.weight`, `2.weight`, `4.weight` | remap `^0\.` → `hidden.0.`, `^2\.` → `hidden.1.`, `^4\.` → `output.` |
/// | [`TransformerLm`](crate::TransformerLm): token / position `nn.Embedding` | `token_embedding.weight`, `position_embedding.weight` | same (not transposed) |
/// | block `i` attention, `nn.Linear` each | `blocks.layers.{i}.mha.{query,key,value,output}.{weight,bias}` | same |
/// | block `i` feed-forward (GELU) | `blocks.layers.{i}.pwff.{linear_inner,linear_outer}.{weight,bias}` | same |
/// | block `i` `nn.LayerNorm` before attention / before feed-forward | `blocks.layers.{i}.norm_2.*` / `blocks.layers.{i}.norm_1.*` | `weight`/`bias` become `gamma`/`beta` |
/// | final `nn.LayerNorm`; optional untied `head` (`nn.Linear`, no bias) | `norm.*`, `head.weight` | same |
///
/// `scripts/make_model_fixtures.py` holds PyTorch modules with exactly these names and the
/// forward passes burn computes (pre-norm blocks, causal attention scaled by `1/√d_head`).
///
/// # Errors
/// As [`load_weights`]; a wrong mapping shows up as [`ModelError::MissingWeights`] listing
/// the model's missing keys next to the file's unused ones.
pub fn import_pytorch_safetensors<M: Module>(
    model: M,
    path: impl AsRef<Path>,
    key_remapping: &[(&str, &str)],
) -> crate::Result<M> {
    let path = path.as_ref();
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter)
        .validate(false)
        .allow_partial(true);
    for &(pattern, replacement) in key_remapping {
        store = store.with_key_remapping(pattern, replacement);
    }
    apply(model, path, store)
}

fn apply<M: Module, S: ModuleStore>(mut model: M, path: &Path, mut store: S) -> crate::Result<M> {
    if !path.is_file() {
        return Err(file_error(path, "no such file"));
    }
    let result: ApplyResult = model
        .load_from(&mut store)
        .map_err(|e| file_error(path, &e.to_string()))?;
    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path: key,
                expected,
                found,
            } => ModelError::WeightShape {
                path: path.display().to_string(),
                key: key.clone(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
            other => file_error(path, &format!("{other:?}")),
        });
    }
    if !result.missing.is_empty() {
        return Err(ModelError::MissingWeights {
            path: path.display().to_string(),
            missing: result.missing.iter().map(|(key, _)| key.clone()).collect(),
            unused: result.unused.clone(),
        });
    }
    Ok(model)
}

fn file_error(path: &Path, reason: &str) -> ModelError {
    ModelError::WeightFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}
