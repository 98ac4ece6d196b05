//! Llama weights in and out: GGUF files, Hugging Face directories (`config.json` +
//! safetensors, sharded too), and export in the Hugging Face layout.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    ApplyError, ApplyResult, BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::{Bytes, DType, Device};

use crate::llm::error::{LlmError, LlmResult};
use crate::llm::gguf::GgufFile;
use crate::llm::llama::{Llama, LlamaConfig};

/// The architectures (`general.architecture`, `model_type`) this crate runs.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, qwen2";

/// Reads a [`LlamaConfig`] from a GGUF file's metadata (`{arch}.block_count`, ...).
///
/// # Errors
/// [`LlmError::Unsupported`] for another architecture, [`LlmError::MissingKey`] for a missing
/// key, [`LlmError::Config`] for values out of range.
pub fn gguf_config(gguf: &GgufFile) -> LlmResult<LlamaConfig> {
    let arch = gguf.get_str("general.architecture")?;
    if !matches!(arch, "llama" | "qwen2") {
        return Err(LlmError::Unsupported {
            path: gguf.path().to_path_buf(),
            what: format!("architecture {arch:?}"),
            reason: format!("supported: {SUPPORTED_ARCHITECTURES}"),
        });
    }
    let key = |name: &str| format!("{arch}.{name}");
    let usize_of = |name: &str| gguf.get_u64(&key(name)).map(|v| v as usize);
    let embedding = gguf
        .tensor("token_embd.weight")
        .ok_or_else(|| LlmError::MissingTensor {
            path: gguf.path().to_path_buf(),
            tensor: "token_embd.weight".into(),
        })?;
    let vocab = match gguf.metadata().get(&key("vocab_size")).and_then(|v| v.as_u64()) {
        Some(v) => v as usize,
        None => embedding.shape()[0],
    };
    let heads = usize_of("attention.head_count")?;
    let width = usize_of("embedding_length")?;
    let mut config = LlamaConfig::new(
        vocab,
        width,
        usize_of("feed_forward_length")?,
        usize_of("block_count")?,
        heads,
    )
    .with_kv_heads(match gguf.metadata().get(&key("attention.head_count_kv")) {
        Some(v) => v.as_u64().ok_or_else(|| {
            LlmError::invalid(
                gguf.path(),
                key("attention.head_count_kv"),
                "not a non-negative integer",
            )
        })? as usize,
        None => heads,
    })
    .with_context(usize_of("context_length")?)
    .with_tied_head(gguf.tensor("output.weight").is_none());
    config.rms_norm_eps = gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?;
    if let Some(theta) = gguf.metadata().get(&key("rope.freq_base")) {
        config.rope_theta = theta
            .as_f64()
            .ok_or_else(|| LlmError::invalid(gguf.path(), key("rope.freq_base"), "not a float"))?;
    }
    if let Some(dims) = gguf
        .metadata()
        .get(&key("rope.dimension_count"))
        .and_then(|v| v.as_u64())
        && dims as usize != width / heads.max(1)
    {
        config.head_dim = Some(dims as usize);
    }
    if gguf.metadata().contains_key(&key("rope.scaling.type")) {
        let kind = gguf.get_str(&key("rope.scaling.type")).unwrap_or("?");
        if kind != "none" {
            return Err(LlmError::Unsupported {
                path: gguf.path().to_path_buf(),
                what: format!("rotary scaling {kind:?}"),
                reason: "rotary scaling is not supported yet".into(),
            });
        }
    }
    if gguf.tensor("rope_freqs.weight").is_some() {
        return Err(LlmError::Unsupported {
            path: gguf.path().to_path_buf(),
            what: "tensor \"rope_freqs.weight\" (Llama 3.1-style rotary scaling)".into(),
            reason: "rotary scaling is not supported yet".into(),
        });
    }
    let last = format!("blk.{}.attn_norm.weight", config.num_hidden_layers.saturating_sub(1));
    if config.num_hidden_layers == 0 || gguf.tensor(&last).is_none() {
        return Err(LlmError::invalid(
            gguf.path(),
            key("block_count"),
            format!("{} blocks, but there is no tensor {last:?}", config.num_hidden_layers),
        ));
    }
    config.model_type = arch.to_string();
    // llama's biases are optional (attention_bias); Qwen2 always has q/k/v biases.
    config.attention_bias = arch == "llama" && gguf.tensor("blk.0.attn_q.bias").is_some();
    config.bos_token_id = gguf
        .metadata()
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    config.eos_token_id = gguf
        .metadata()
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.as_u64())
        .map(serde_json::Value::from);
    config.validate()?;
    Ok(config)
}

/// How a GGUF tensor becomes a Hugging Face one: its name there, and for llama's q and k
/// projections the number of heads whose rows llama.cpp's converter interleaved.
fn gguf_to_hf(name: &str, arch: &str, config: &LlamaConfig) -> Option<(String, Option<usize>)> {
    match name {
        "token_embd.weight" => return Some(("embed_tokens.weight".into(), None)),
        "output_norm.weight" => return Some(("norm.weight".into(), None)),
        "output.weight" => return Some(("lm_head.weight".into(), None)),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (index, part) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    // llama.cpp interleaves the rows of llama's q and k projections, biases included.
    let permute = |heads| (arch == "llama").then_some(heads);
    let (hf, heads) = match module {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", permute(config.num_attention_heads)),
        "attn_k" => ("self_attn.k_proj", permute(config.kv_heads())),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("layers.{index}.{hf}.{kind}"), heads))
}

/// The shape each Hugging Face tensor must have under `config` (PyTorch layout, `[out, in]`).
fn expected_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (w, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv) = (
        config.num_attention_heads * config.head_width(),
        config.kv_heads() * config.head_width(),
    );
    let mut shapes = vec![
        ("embed_tokens.weight".to_string(), vec![v, w]),
        ("norm.weight".into(), vec![w]),
    ];
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![v, w]));
    }
    let qkv_bias = config.attention_bias || config.model_type == "qwen2";
    for i in 0..config.num_hidden_layers {
        let p = |name: &str| format!("layers.{i}.{name}");
        shapes.extend([
            (p("input_layernorm.weight"), vec![w]),
            (p("post_attention_layernorm.weight"), vec![w]),
            (p("self_attn.q_proj.weight"), vec![q, w]),
            (p("self_attn.k_proj.weight"), vec![kv, w]),
            (p("self_attn.v_proj.weight"), vec![kv, w]),
            (p("self_attn.o_proj.weight"), vec![w, q]),
            (p("mlp.gate_proj.weight"), vec![f, w]),
            (p("mlp.up_proj.weight"), vec![f, w]),
            (p("mlp.down_proj.weight"), vec![w, f]),
        ]);
        if qkv_bias {
            shapes.extend([
                (p("self_attn.q_proj.bias"), vec![q]),
                (p("self_attn.k_proj.bias"), vec![kv]),
                (p("self_attn.v_proj.bias"), vec![kv]),
            ]);
        }
        if config.attention_bias && config.model_type != "qwen2" {
            shapes.push((p("self_attn.o_proj.bias"), vec![w]));
        }
    }
    shapes
}

/// Undoes llama.cpp's row interleaving of a q or k projection (`[heads · 2 · half, in]`):
/// GGUF row `h·2·half + 2i + j` is Hugging Face row `h·2·half + j·half + i`.
fn unpermute_rows(values: Vec<f32>, rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * 2 * half + 2 * i + j;
                let to = h * 2 * half + j * half + i;
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Loads a Llama-family model from a GGUF file: the config from its metadata, every tensor
/// dequantised to f32 (lazily, one at a time, as the model takes it) and mapped to Hugging
/// Face's layout.
///
/// # Errors
/// Any [`GgufFile::open`] error; [`LlmError::TensorShape`] for a tensor that disagrees with
/// the config; [`LlmError::MissingTensor`]; [`LlmError::UnsupportedTensorType`] for a tensor
/// in a type outside [`SUPPORTED_TYPES`](crate::llm::gguf::SUPPORTED_TYPES), all before any
/// weight is dequantised.
pub fn load_gguf(path: impl AsRef<Path>, device: &Device) -> LlmResult<(Llama, Arc<GgufFile>)> {
    let gguf = Arc::new(GgufFile::open(path)?);
    let model = load_gguf_file(Arc::clone(&gguf), device)?;
    Ok((model, gguf))
}

/// [`load_gguf`] for a file already opened.
///
/// # Errors
/// As [`load_gguf`].
pub fn load_gguf_file(gguf: Arc<GgufFile>, device: &Device) -> LlmResult<Llama> {
    let config = gguf_config(&gguf)?;
    let arch = config.model_type.clone();
    let mut tensors = Vec::new();
    let mut seen = BTreeSet::new();
    let expected: std::collections::BTreeMap<_, _> = expected_shapes(&config).into_iter().collect();
    for info in gguf.tensors() {
        // A tensor this architecture does not use is an error: skipping it would run a
        // different model than the file describes.
        let unknown = || {
            Err(LlmError::Unsupported {
                path: gguf.path().to_path_buf(),
                what: format!("tensor {:?}", info.name),
                reason: format!("it is not part of the {arch} architecture as this crate implements it"),
            })
        };
        let Some((hf_name, heads)) = gguf_to_hf(&info.name, &arch, &config) else {
            return unknown();
        };
        let Some(shape) = expected.get(&hf_name) else {
            return unknown();
        };
        if &info.shape() != shape {
            return Err(LlmError::TensorShape {
                path: gguf.path().to_path_buf(),
                tensor: info.name.clone(),
                expected: shape.iter().rev().copied().collect(),
                found: info.dims.iter().map(|&d| d as usize).collect(),
            });
        }
        if info.size.is_none() || !crate::llm::gguf::is_supported(info.dtype) {
            return Err(LlmError::UnsupportedTensorType {
                path: gguf.path().to_path_buf(),
                tensor: info.name.clone(),
                dtype: info.dtype.name(),
                supported: crate::llm::gguf::SUPPORTED_TYPES,
            });
        }
        seen.insert(hf_name.clone());
        let file = Arc::clone(&gguf);
        let name = info.name.clone();
        let shape = shape.clone();
        let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
        tensors.push(PackTensor::deferred(
            hf_name,
            DType::F32,
            shape.clone(),
            None,
            shape.iter().product::<usize>() * 4,
            move || {
                let values = file
                    .dequantize(&name)
                    .map_err(|e| burn::store::burn_pack::Error::IoError(e.to_string()))?;
                let values = match heads {
                    Some(heads) => unpermute_rows(values, rows, cols, heads),
                    None => values,
                };
                Ok(Bytes::from_elems(values))
            },
        ));
    }
    if let Some((missing, _)) = expected.iter().find(|(name, _)| !seen.contains(*name)) {
        return Err(LlmError::MissingTensor {
            path: gguf.path().to_path_buf(),
            tensor: hf_tensor_to_gguf(missing),
        });
    }
    let mut model = config.init(device)?;
    let result = model.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    check_applied(gguf.path(), &result, &expected.keys().cloned().collect())?;
    Ok(model)
}

fn hf_tensor_to_gguf(hf: &str) -> String {
    let table = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    match hf {
        "embed_tokens.weight" => "token_embd.weight".into(),
        "norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        other => {
            let mut name = other.replacen("layers.", "blk.", 1);
            for (from, to) in table {
                name = name.replace(from, to);
            }
            name
        }
    }
}

fn check_applied(path: &Path, result: &ApplyResult, expected: &BTreeSet<String>) -> LlmResult<()> {
    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path: key,
                expected,
                found,
            } => LlmError::TensorShape {
                path: path.to_path_buf(),
                tensor: key.clone(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
            other => LlmError::invalid(path, "weights", format!("{other:?}")),
        });
    }
    if let Some((missing, _)) = result.missing.first() {
        return Err(LlmError::MissingTensor {
            path: path.to_path_buf(),
            tensor: missing.clone(),
        });
    }
    // burn names an RMSNorm's scale `gamma` where Hugging Face says `weight`.
    let applied: BTreeSet<_> = result
        .applied
        .iter()
        .map(|name| match name.strip_suffix(".gamma") {
            Some(norm) => format!("{norm}.weight"),
            None => name.clone(),
        })
        .collect();
    if let Some(missing) = expected.iter().find(|name| !applied.contains(*name)) {
        return Err(LlmError::MissingTensor {
            path: path.to_path_buf(),
            tensor: missing.clone(),
        });
    }
    Ok(())
}

/// Reads `config.json` of a Hugging Face model directory.
///
/// # Errors
/// [`LlmError::Io`] for a missing file, [`LlmError::Invalid`] for JSON that is not a Llama
/// config, [`LlmError::Config`] for values out of range.
pub fn hf_config(dir: impl AsRef<Path>) -> LlmResult<LlamaConfig> {
    let path = dir.as_ref().join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LlmError::io(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LlmError::invalid(&path, "config.json", e.to_string()))?;
    let model_type = json.get("model_type").and_then(|t| t.as_str()).unwrap_or("llama");
    if !matches!(model_type, "llama" | "qwen2") {
        return Err(LlmError::Unsupported {
            path,
            what: format!("model_type {model_type:?}"),
            reason: format!("supported: {SUPPORTED_ARCHITECTURES}"),
        });
    }
    let config = LlamaConfig::from_json(&text).map_err(|e| match e {
        LlmError::Config { field, value, reason } => LlmError::invalid(&path, field, format!("{value}: {reason}")),
        other => other,
    })?;
    Ok(config)
}

/// The safetensors files of a Hugging Face directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names.
fn safetensors_files(dir: &Path) -> LlmResult<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(LlmError::Invalid {
            path: dir.to_path_buf(),
            field: "weights".into(),
            reason: "neither model.safetensors nor model.safetensors.index.json is there".into(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| LlmError::io(&index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LlmError::invalid(&index, "index", e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LlmError::invalid(&index, "weight_map", "missing or not an object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains('\\') && !f.starts_with('.'))
            .ok_or_else(|| LlmError::invalid(&index, tensor, "the shard is not a plain file name"))?;
        shards.insert(dir.join(file));
    }
    Ok(shards.into_iter().collect())
}

/// Loads a Hugging Face directory: `config.json` and `model.safetensors` (or its shards), f32,
/// f16 or bf16 tensors, all cast to f32.
///
/// # Errors
/// As [`hf_config`]; [`LlmError::Io`] for a missing weight file; [`LlmError::TensorShape`] and
/// [`LlmError::MissingTensor`] for weights that do not fit the config.
pub fn load_hf(dir: impl AsRef<Path>, device: &Device) -> LlmResult<Llama> {
    let dir = dir.as_ref();
    let config = hf_config(dir)?;
    let files = safetensors_files(dir)?;
    let expected: BTreeSet<String> = expected_shapes(&config).into_iter().map(|(name, _)| name).collect();
    let mut model = config.init(device)?;
    let mut applied = ApplyResult {
        applied: Vec::new(),
        skipped: Vec::new(),
        missing: Vec::new(),
        unused: Vec::new(),
        errors: Vec::new(),
    };
    for file in &files {
        if !file.is_file() {
            return Err(LlmError::io(file, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let mut store = SafetensorsStore::from_file(file)
            .with_from_adapter(PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32)))
            .with_key_remapping(r"^model\.", "")
            .validate(false)
            .allow_partial(true);
        let result = model
            .load_from(&mut store)
            .map_err(|e| LlmError::invalid(file, "safetensors", e.to_string()))?;
        applied.applied.extend(result.applied);
        applied.errors.extend(result.errors);
    }
    check_applied(files.first().map_or(dir, |f| f.as_path()), &applied, &expected)?;
    Ok(model)
}

/// Writes `model` as a Hugging Face directory that `transformers` loads
/// (`AutoModelForCausalLM.from_pretrained(dir)`): `config.json` and `model.safetensors` (f32).
/// Tokenizer files are written by [`ChatTokenizer::save`](crate::llm::ChatTokenizer::save).
/// Files are written under temporary names and renamed, so a failed export leaves no
/// half-written file.
///
/// # Errors
/// [`LlmError::Io`] when the directory cannot be made or written.
pub fn export_hf(model: &Llama, dir: impl AsRef<Path>) -> LlmResult<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| LlmError::io(dir, e))?;
    let config = model.config();
    let mut json = serde_json::to_value(config).expect("a config serialises");
    let object = json.as_object_mut().expect("a config is an object");
    let architecture = if config.model_type == "qwen2" {
        "Qwen2ForCausalLM"
    } else {
        "LlamaForCausalLM"
    };
    object.insert("architectures".into(), serde_json::json!([architecture]));
    object.insert("torch_dtype".into(), "float32".into());
    object.insert("num_key_value_heads".into(), config.kv_heads().into());
    object.insert("head_dim".into(), config.head_width().into());
    object.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_theta": config.rope_theta, "rope_type": "default"}),
    );
    let path = dir.join("model.safetensors");
    // Atomically, and the config only after the weights it describes: an export that fails
    // leaves no partial file.
    crate::files::save_atomically(
        &path,
        |temporary| {
            let mut store = SafetensorsStore::from_file(temporary)
                .with_to_adapter(BurnToPyTorchAdapter)
                .with_key_remapping(r"^(embed_tokens|layers|norm)\.", "model.$1.")
                .metadata("format", "pt")
                .overwrite(true);
            model
                .valid()
                .save_into(&mut store)
                .map_err(|error| LlmError::invalid(&path, "safetensors", error.to_string()))
        },
        |error| LlmError::io(&path, error),
    )?;
    let text = serde_json::to_string_pretty(&json).expect("JSON serialises");
    crate::llm::write_atomically(&dir.join("config.json"), text.as_bytes())
}
