//! Running a teacher over a dataset once and writing its outputs to a cache file.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Device, Tensor, activation};
use burn_distill_model::{Fingerprint, Teacher};
use indicatif::{ProgressBar, ProgressStyle};
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use crate::batch::{Batch, Fingerprinted, Indexed};
use crate::cache::format::{CacheHeader, CacheMode, FORMAT_VERSION, Trailer};
use crate::cache::read::{ExpectedSource, TeacherCache};
use crate::error::{DataError, Result};

/// How to build a cache.
#[derive(Debug, Clone)]
pub struct CacheBuildOptions {
    /// What to store.
    pub mode: CacheMode,
    /// Examples per teacher call.
    pub batch_size: usize,
    /// Show a progress bar on standard error.
    pub progress: bool,
    /// The teacher's fingerprint when [`Teacher::fingerprint`] has none (or to override it).
    pub teacher_fingerprint: Option<Fingerprint>,
    /// Set this flag (from a Ctrl-C handler, say) to stop after the current batch; the examples
    /// written so far are kept and the next build resumes from them.
    pub stop: Option<Arc<AtomicBool>>,
}

impl CacheBuildOptions {
    /// Options for `mode`: batches of 256, no progress bar.
    pub fn new(mode: CacheMode) -> Self {
        Self {
            mode,
            batch_size: 256,
            progress: false,
            teacher_fingerprint: None,
            stop: None,
        }
    }

    /// Sets the batch size.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Turns the progress bar on or off.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Sets the teacher fingerprint to record.
    pub fn with_teacher_fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        self.teacher_fingerprint = Some(fingerprint);
        self
    }

    /// Sets the stop flag.
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }
}

/// What a cache build did.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheReport {
    /// The cache file.
    pub path: PathBuf,
    /// Examples in it.
    pub examples: usize,
    /// Examples taken from an interrupted earlier build (0 for a fresh build).
    pub resumed_from: usize,
    /// A complete cache for this teacher and dataset already existed and was kept as it was.
    pub reused: bool,
    /// Why an existing file at `path` (or a `.partial`) was replaced, if one was.
    pub replaced: Option<String>,
    /// Size of the file.
    pub bytes: u64,
    /// Wall time of the build.
    pub seconds: f64,
    /// Of which inside the teacher (including reading its outputs back).
    pub teacher_seconds: f64,
}

/// The path of the file a build writes before renaming it to `path`.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Runs `teacher` over every example of `dataset` (in dataset order, batched by `batcher` on
/// `device`) and writes its outputs to the cache file `path`.
///
/// - An existing complete cache for the same teacher, dataset and mode is kept
///   (`reused: true`); a stale or damaged one is rebuilt.
/// - The file is written as `path.partial` and renamed when complete, so `path` is never
///   half-written. An interrupted build (an error, a stop request, a killed process) leaves the
///   `.partial` file; the next build for the same teacher and dataset resumes after its last
///   whole record.
///
/// # Errors
/// [`DataError::Invalid`] for bad options, a teacher without a fingerprint, wrong output shapes
/// or a non-finite logit; [`DataError::Teacher`] when the teacher fails;
/// [`DataError::Interrupted`] when stopped; [`DataError::Io`] for file errors.
pub fn build_cache<T, S, It, Bt, B, const R: usize>(
    path: &Path,
    teacher: &T,
    dataset: &S,
    batcher: &Bt,
    device: &Device,
    options: &CacheBuildOptions,
) -> Result<CacheReport>
where
    T: Teacher<B::Input, R>,
    S: Dataset<It> + Fingerprinted,
    It: Indexed,
    Bt: Batcher<It, B>,
    B: Batch,
{
    let start = Instant::now();
    if options.batch_size == 0 {
        return Err(DataError::invalid("batch_size", "must be at least 1"));
    }
    if !(R == 2 || R == 3) {
        return Err(DataError::invalid(
            "logit rank",
            format!("{R}: caches hold rank 2 or 3 logits"),
        ));
    }
    let classes = teacher.num_classes();
    if let CacheMode::TopK { k } = options.mode
        && (k == 0 || k > classes)
    {
        return Err(DataError::invalid("top-k", format!("k = {k} for {classes} classes")));
    }
    let examples = dataset.len();
    if examples == 0 {
        return Err(DataError::invalid("dataset", "is empty"));
    }
    let teacher_fingerprint = options
        .teacher_fingerprint
        .or_else(|| teacher.fingerprint())
        .ok_or_else(|| {
            DataError::invalid(
                "teacher fingerprint",
                "this teacher has none; set CacheBuildOptions::teacher_fingerprint",
            )
        })?;
    let expected = ExpectedSource {
        dataset: dataset.fingerprint(),
        teacher: teacher_fingerprint,
    };

    let mut replaced = None;
    if path.exists() {
        match TeacherCache::open_for(path, &expected) {
            Ok(cache) if cache.header().mode == options.mode && cache.header().rank == R => {
                return Ok(CacheReport {
                    path: path.to_path_buf(),
                    examples,
                    resumed_from: 0,
                    reused: true,
                    replaced: None,
                    bytes: file_len(path)?,
                    seconds: start.elapsed().as_secs_f64(),
                    teacher_seconds: 0.0,
                });
            }
            Ok(cache) => replaced = Some(format!("it held {} outputs", cache.header().mode)),
            Err(error) => replaced = Some(error.to_string()),
        }
    }

    let partial = partial_path(path);
    let mut resume = None;
    if partial.exists() {
        match resume_partial(&partial, &expected, options.mode, examples, R) {
            Ok(state) => resume = Some(state),
            Err(reason) => replaced = Some(format!("{}: {reason}", partial.display())),
        }
    }

    let (mut writer, mut header, mut hasher, done) = match resume {
        Some(ResumeState {
            file,
            header,
            hasher,
            done,
        }) => (Some(BufWriter::new(file)), Some(header), hasher, done),
        None => (None, None, Xxh3::new(), 0),
    };
    let resumed_from = done;

    let bar = if options.progress {
        let bar = ProgressBar::new(examples as u64).with_style(
            ProgressStyle::with_template("caching teacher outputs {bar:40} {pos}/{len} [{elapsed} < {eta}] {per_sec}")
                .expect("a valid template"),
        );
        bar.set_position(done as u64);
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut teacher_seconds = 0.0;
    let mut position = done;
    while position < examples {
        if options.stop.as_ref().is_some_and(|stop| stop.load(Ordering::Relaxed)) {
            if let Some(writer) = writer.as_mut() {
                writer.flush().map_err(|error| DataError::io(&partial, error))?;
            }
            bar.abandon();
            return Err(DataError::Interrupted {
                path: partial,
                done: position,
                total: examples,
            });
        }
        let end = (position + options.batch_size).min(examples);
        let items: Vec<It> = (position..end)
            .map(|i| dataset.get(i))
            .collect::<core::result::Result<_, _>>()
            .map_err(|error| DataError::invalid("dataset", format!("example {position}..{end}: {error}")))?;
        let indices: Vec<usize> = items.iter().map(Indexed::index).collect();
        let batch = batcher.batch(items, device);
        let teacher_start = Instant::now();
        let output = teacher
            .teach_examples(batch.input(), batch.indices(), &[])
            .map_err(|source| DataError::Teacher {
                first: position,
                end,
                source,
            })?;
        let logits = output.into_parts().0;
        let dims = logits.dims();
        let positions = if R == 3 { dims[1] } else { 1 };
        if dims[0] != end - position || dims[R - 1] != classes {
            return Err(DataError::invalid(
                "teacher output",
                format!(
                    "logits of shape {dims:?} for {} examples of {classes} classes",
                    end - position
                ),
            ));
        }
        // The teacher's time includes reading its outputs back (burn runs lazily until then).
        let host = HostOutputs::read(logits, options.mode);
        teacher_seconds += teacher_start.elapsed().as_secs_f64();
        let encoded = encode_batch(host, options.mode, &indices, positions, classes, position)?;

        if header.is_none() {
            let new_header = CacheHeader {
                format_version: FORMAT_VERSION,
                mode: options.mode,
                rank: R,
                positions,
                classes,
                examples,
                dataset: expected.dataset,
                teacher: expected.teacher,
                writer: concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")).to_string(),
            };
            let file = File::create(&partial).map_err(|error| DataError::io(&partial, error))?;
            let mut new_writer = BufWriter::new(file);
            new_writer
                .write_all(&new_header.encode())
                .map_err(|error| DataError::io(&partial, error))?;
            writer = Some(new_writer);
            header = Some(new_header);
        }
        let header = header.as_ref().expect("set above");
        if header.positions != positions {
            return Err(DataError::invalid(
                "teacher output",
                format!(
                    "{positions} positions per example, earlier batches had {}",
                    header.positions
                ),
            ));
        }
        hasher.update(&encoded);
        writer
            .as_mut()
            .expect("set with the header")
            .write_all(&encoded)
            .map_err(|error| DataError::io(&partial, error))?;
        bar.set_position(end as u64);
        position = end;
    }

    let header = header.expect("at least one batch was written");
    seal(writer.expect("set with the header"), &header, &hasher, &partial, path)?;
    bar.finish_and_clear();
    Ok(CacheReport {
        path: path.to_path_buf(),
        examples,
        resumed_from,
        reused: false,
        replaced,
        bytes: file_len(path)?,
        seconds: start.elapsed().as_secs_f64(),
        teacher_seconds,
    })
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|error| DataError::io(path, error))?
        .len())
}

/// A batch of teacher outputs read back to the host: the logits, and for top-k mode the top-k
/// log-probabilities and classes (computed on the device).
struct HostOutputs {
    logits: Vec<f32>,
    top_k: Option<(Vec<f32>, Vec<i64>)>,
}

impl HostOutputs {
    fn read<const R: usize>(logits: Tensor<R>, mode: CacheMode) -> Self {
        let top_k = match mode {
            CacheMode::TopK { k } => {
                let (values, classes) = activation::log_softmax(logits.clone(), R - 1).topk_with_indices(k, R - 1);
                Some((
                    values.into_data().iter::<f32>().collect(),
                    classes.into_data().iter::<i64>().collect(),
                ))
            }
            CacheMode::DenseF32 | CacheMode::DenseF16 => None,
        };
        Self {
            logits: logits.into_data().iter::<f32>().collect(),
            top_k,
        }
    }
}

/// Encodes one batch of outputs as records, refusing non-finite logits.
fn encode_batch(
    host: HostOutputs,
    mode: CacheMode,
    indices: &[usize],
    positions: usize,
    classes: usize,
    first: usize,
) -> Result<Vec<u8>> {
    let per_example = positions * classes;
    if let Some(at) = host.logits.iter().position(|value| !value.is_finite()) {
        return Err(DataError::invalid(
            "teacher output",
            format!(
                "non-finite logit {} for example {} (position {}, class {})",
                host.logits[at],
                first + at / per_example,
                at % per_example / classes,
                at % classes
            ),
        ));
    }
    let record_payload = positions * mode.bytes_per_position(classes);
    let mut bytes = Vec::with_capacity(indices.len() * (8 + record_payload));
    match (mode, host.top_k) {
        (CacheMode::TopK { k }, Some((top_values, top_indices))) => {
            let per_example_k = positions * k;
            for (example, &index) in indices.iter().enumerate() {
                bytes.extend_from_slice(&(index as u64).to_le_bytes());
                let span = example * per_example_k..(example + 1) * per_example_k;
                top_indices[span.clone()]
                    .iter()
                    .for_each(|&class| bytes.extend_from_slice(&(class as u32).to_le_bytes()));
                top_values[span]
                    .iter()
                    .for_each(|value| bytes.extend_from_slice(&value.to_le_bytes()));
            }
        }
        _ => {
            for (example, &index) in indices.iter().enumerate() {
                bytes.extend_from_slice(&(index as u64).to_le_bytes());
                let row = &host.logits[example * per_example..(example + 1) * per_example];
                if mode == CacheMode::DenseF32 {
                    row.iter()
                        .for_each(|value| bytes.extend_from_slice(&value.to_le_bytes()));
                } else {
                    row.iter()
                        .for_each(|value| bytes.extend_from_slice(&half::f16::from_f32(*value).to_le_bytes()));
                }
            }
        }
    }
    Ok(bytes)
}

/// Ends a cache file: the trailer (record count, records' and header's hashes), a sync, the
/// rename from `partial` to `path`, and a best-effort sync of the directory.
fn seal(writer: BufWriter<File>, header: &CacheHeader, hasher: &Xxh3, partial: &Path, path: &Path) -> Result<()> {
    let mut file = writer
        .into_inner()
        .map_err(|error| DataError::io(partial, error.into_error()))?;
    let trailer = Trailer {
        examples: header.examples as u64,
        records_hash: hasher.digest128(),
        header_hash: xxh3_128(&header.encode()),
    };
    file.write_all(&trailer.encode())
        .and_then(|()| file.sync_all())
        .map_err(|error| DataError::io(partial, error))?;
    drop(file);
    std::fs::rename(partial, path).map_err(|error| DataError::io(path, error))?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        // Make the rename durable; not every platform can open a directory, hence best effort.
        let _ = File::open(dir).and_then(|dir| dir.sync_all());
    }
    Ok(())
}

struct ResumeState {
    file: File,
    header: CacheHeader,
    hasher: Xxh3,
    done: usize,
}

/// Opens a `.partial` file for appending when it was made for the same teacher, dataset and
/// mode; cuts it back to its last whole record and re-hashes what it keeps.
fn resume_partial(
    partial: &Path,
    expected: &ExpectedSource,
    mode: CacheMode,
    examples: usize,
    rank: usize,
) -> core::result::Result<ResumeState, String> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(partial)
        .map_err(|error| error.to_string())?;
    let mut prefix = vec![0u8; 16];
    file.read_exact(&mut prefix).map_err(|error| error.to_string())?;
    let length = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes")) as usize;
    prefix.resize(16 + length, 0);
    file.read_exact(&mut prefix[16..]).map_err(|error| error.to_string())?;
    let (header, data_start) = CacheHeader::decode(partial, &prefix).map_err(|error| error.to_string())?;
    if header.dataset != expected.dataset
        || header.teacher != expected.teacher
        || header.mode != mode
        || header.examples != examples
        || header.rank != rank
    {
        return Err("made for another teacher, dataset or mode".into());
    }
    let len = file.metadata().map_err(|error| error.to_string())?.len() as usize;
    let record = header.record_bytes();
    let done = (len.saturating_sub(data_start) / record).min(examples);
    let keep = data_start + done * record;
    file.set_len(keep as u64).map_err(|error| error.to_string())?;
    let mut hasher = Xxh3::new();
    file.seek(SeekFrom::Start(data_start as u64))
        .map_err(|error| error.to_string())?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut left = keep - data_start;
    while left > 0 {
        let take = left.min(buffer.len());
        file.read_exact(&mut buffer[..take])
            .map_err(|error| error.to_string())?;
        hasher.update(&buffer[..take]);
        left -= take;
    }
    file.seek(SeekFrom::End(0)).map_err(|error| error.to_string())?;
    Ok(ResumeState {
        file,
        header,
        hasher,
        done,
    })
}

/// Writes a complete top-`k` cache for `dataset` from log-probabilities made elsewhere, such
/// as the top log-probabilities a served teacher returned with its answers (black-box
/// distillation through an API). `record(i)` gives example `i`'s `positions × k` class ids
/// and their log-probabilities at temperature 1, position by position, most likely first.
/// The file is the one [`build_cache`] writes, so [`CachedTeacher`](crate::CachedTeacher)
/// reads it; `teacher` is the fingerprint that reader will be asked for.
///
/// Written as `path.partial` and renamed once complete; an existing file is replaced.
///
/// # Errors
/// [`DataError::Invalid`] for `k = 0`, `k > classes`, an empty dataset, a record of the wrong
/// length, a class id out of range, or a log-probability that is not finite or above 0 (by
/// more than rounding); [`DataError::Io`]. Nothing is left at `path` on error.
pub fn write_top_k_cache<S, It>(
    path: &Path,
    dataset: &S,
    teacher: Fingerprint,
    classes: usize,
    positions: usize,
    k: usize,
    mut record: impl FnMut(usize) -> Result<(Vec<u32>, Vec<f32>)>,
) -> Result<CacheReport>
where
    S: Dataset<It> + Fingerprinted,
    It: Indexed,
{
    let start = Instant::now();
    if k == 0 || k > classes {
        return Err(DataError::invalid("top-k", format!("k = {k} for {classes} classes")));
    }
    let examples = dataset.len();
    if examples == 0 || positions == 0 {
        return Err(DataError::invalid("dataset", "is empty"));
    }
    let header = CacheHeader {
        format_version: FORMAT_VERSION,
        mode: CacheMode::TopK { k },
        rank: 3,
        positions,
        classes,
        examples,
        dataset: dataset.fingerprint(),
        teacher,
        writer: concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")).to_string(),
    };
    let partial = partial_path(path);
    let mut write = || -> Result<()> {
        let file = File::create(&partial).map_err(|error| DataError::io(&partial, error))?;
        let mut writer = BufWriter::new(file);
        let mut hasher = Xxh3::new();
        writer
            .write_all(&header.encode())
            .map_err(|error| DataError::io(&partial, error))?;
        let per_example = positions * k;
        let mut bytes = Vec::with_capacity(8 + 8 * per_example);
        for example in 0..examples {
            let index = dataset
                .get(example)
                .map_err(|error| DataError::invalid("dataset", format!("example {example}: {error}")))?
                .index();
            let (ids, log_probs) = record(example)?;
            let bad = |reason: String| {
                Err(DataError::invalid(
                    "top-k record",
                    format!("example {example}: {reason}"),
                ))
            };
            if ids.len() != per_example || log_probs.len() != per_example {
                return bad(format!(
                    "{} ids and {} log-probabilities, expected {positions} positions × {k}",
                    ids.len(),
                    log_probs.len()
                ));
            }
            if let Some(id) = ids.iter().find(|&&id| id as usize >= classes) {
                return bad(format!("class {id} of {classes}"));
            }
            if let Some(lp) = log_probs.iter().find(|lp| !lp.is_finite() || **lp > 1e-4) {
                return bad(format!("log-probability {lp}"));
            }
            bytes.clear();
            bytes.extend_from_slice(&(index as u64).to_le_bytes());
            ids.iter().for_each(|id| bytes.extend_from_slice(&id.to_le_bytes()));
            log_probs
                .iter()
                .for_each(|lp| bytes.extend_from_slice(&lp.min(0.0).to_le_bytes()));
            hasher.update(&bytes);
            writer
                .write_all(&bytes)
                .map_err(|error| DataError::io(&partial, error))?;
        }
        seal(writer, &header, &hasher, &partial, path)
    };
    if let Err(error) = write() {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    Ok(CacheReport {
        path: path.to_path_buf(),
        examples,
        resumed_from: 0,
        reused: false,
        replaced: None,
        bytes: file_len(path)?,
        seconds: start.elapsed().as_secs_f64(),
        teacher_seconds: 0.0,
    })
}
