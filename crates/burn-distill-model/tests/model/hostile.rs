//! The model crate's readers against thousands of damaged versions of valid files
//! (`burn_distill_testing::hostile`): a GGUF file (header, metadata, tensor table, tensor data)
//! loaded whole with its tokenizer, a PyTorch safetensors file imported into a model, and a
//! burnpack file loaded into one. Each case is `Ok` or an error naming the file, never a panic
//! or a hang.

use std::path::Path;
use std::time::Duration;

use burn::tensor::Device;
use burn_distill_model::llm::load_model;
use burn_distill_model::{MlpConfig, import_pytorch_safetensors, load_weights, save_weights};
use burn_distill_testing::hostile::check_reader;

const TIMEOUT: Duration = Duration::from_secs(20);

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn a_gguf_file_with_its_tokenizer_survives_hostile_bytes() {
    let valid = std::fs::read(fixtures().join("llama/tiny-q4_0.gguf")).unwrap();
    // The header, metadata (tokenizer included) and tensor table take the first 60 KiB or so.
    let report = check_reader("tiny.gguf", valid, 64 * 1024, TIMEOUT, |path| {
        load_model(path, &Device::flex()).map(|loaded| loaded.model.config().vocab_size)
    });
    assert!(report.refused > 0, "{report:?}");
}

#[test]
fn a_safetensors_import_survives_hostile_bytes() {
    let valid = std::fs::read(fixtures().join("models/mlp.safetensors")).unwrap();
    let report = check_reader("mlp.safetensors", valid, 256, TIMEOUT, |path| {
        let architecture = MlpConfig::new(12, vec![16, 8], 5).init(&Device::flex());
        import_pytorch_safetensors(architecture, path, &[]).map(|_| ())
    });
    assert!(report.refused > 0, "{report:?}");
}

#[test]
fn a_burnpack_load_survives_hostile_bytes() {
    let path = burn_distill_testing::scratch("hostile-burnpack").join("mlp.bpk");
    let model = MlpConfig::new(12, vec![16, 8], 5).init(&Device::flex());
    save_weights(&model, &path).unwrap();
    let valid = std::fs::read(&path).unwrap();
    let report = check_reader("mlp.bpk", valid, 256, TIMEOUT, |path| {
        let architecture = MlpConfig::new(12, vec![16, 8], 5).init(&Device::flex());
        load_weights(architecture, path).map(|_| ())
    });
    assert!(report.refused > 0, "{report:?}");
}

/// A Hugging Face directory with its `config.json` or `tokenizer.json` damaged.
#[test]
fn a_hugging_face_directory_with_a_hostile_config_or_tokenizer_is_refused_naming_the_file() {
    let fixture = fixtures().join("llama/hf");
    for file in ["config.json", "tokenizer.json"] {
        let valid = std::fs::read(fixture.join(file)).unwrap();
        let source = fixture.clone();
        let report = check_reader(file, valid, 512, TIMEOUT, move |path| {
            let dir = path.parent().unwrap();
            for entry in std::fs::read_dir(&source).unwrap() {
                let entry = entry.unwrap();
                let target = dir.join(entry.file_name());
                if !target.exists() {
                    std::fs::copy(entry.path(), target).unwrap();
                }
            }
            load_model(dir, &Device::flex()).map(|loaded| loaded.model.config().vocab_size)
        });
        assert!(report.refused > 0, "{file}: {report:?}");
    }
}
