//! Hostile input for every reader: valid files mutated (bits flipped, bytes inserted, deleted
//! and overwritten with lying lengths and offsets, the file cut short) and random bytes, thrown
//! at a reader that must answer each with `Ok` or an error, never a panic or a hang.
//!
//! The number of cases per reader is [`cases`]: 2 000 unless `BURN_DISTILL_HOSTILE_CASES` says
//! otherwise, and each suite stops early after [`budget`] (60 s unless
//! `BURN_DISTILL_HOSTILE_SECONDS` says otherwise), so that CI stays bounded on slow machines.
//! The cases follow [`seed`] (`BURN_DISTILL_HOSTILE_SEED`, 0 by default): reproducible in CI,
//! and other seeds find other cases.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use proptest;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Cases per reader: `BURN_DISTILL_HOSTILE_CASES`, or 2 000.
pub fn cases() -> u32 {
    std::env::var("BURN_DISTILL_HOSTILE_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2_000)
}

/// The seed of the cases: `BURN_DISTILL_HOSTILE_SEED`, or 0, so that a CI run is reproducible;
/// other seeds explore other cases.
pub fn seed() -> u64 {
    std::env::var("BURN_DISTILL_HOSTILE_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn runner() -> TestRunner {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed().to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    )
}

/// The time one suite may take: `BURN_DISTILL_HOSTILE_SECONDS`, or 60 s.
pub fn budget() -> Duration {
    Duration::from_secs(
        std::env::var("BURN_DISTILL_HOSTILE_SECONDS")
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(60),
    )
}

/// Values that lengths, counts and offsets lie with.
const LIES: [u64; 8] = [
    0,
    1,
    0x7f,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// One way of damaging a file. Positions are taken modulo the file's length.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip one bit.
    Flip {
        /// Where.
        at: usize,
        /// Which bit of the byte.
        bit: u8,
    },
    /// Insert bytes.
    Insert {
        /// Where.
        at: usize,
        /// What.
        bytes: Vec<u8>,
    },
    /// Delete a run of bytes.
    Delete {
        /// Where it starts.
        at: usize,
        /// How many bytes.
        len: usize,
    },
    /// Cut the file at a position.
    Truncate {
        /// Where.
        at: usize,
    },
    /// Overwrite 4 or 8 bytes with a lying length or offset.
    Lie {
        /// Where.
        at: usize,
        /// The lie.
        value: u64,
        /// 8 bytes rather than 4.
        wide: bool,
        /// Big-endian rather than little-endian.
        big_endian: bool,
    },
    /// Overwrite one byte.
    Set {
        /// Where.
        at: usize,
        /// The new byte.
        byte: u8,
    },
}

impl Mutation {
    /// Applies the mutation (positions are taken modulo the length).
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        let position = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
        match self {
            Mutation::Flip { at, bit } => {
                if !bytes.is_empty() {
                    let at = position(*at, bytes.len());
                    bytes[at] ^= 1 << (bit % 8);
                }
            }
            Mutation::Insert { at, bytes: inserted } => {
                let at = position(*at, bytes.len() + 1);
                bytes.splice(at..at, inserted.iter().copied());
            }
            Mutation::Delete { at, len } => {
                if !bytes.is_empty() {
                    let at = position(*at, bytes.len());
                    let end = (at + len).min(bytes.len());
                    bytes.drain(at..end);
                }
            }
            Mutation::Truncate { at } => {
                let at = position(*at, bytes.len() + 1);
                bytes.truncate(at);
            }
            Mutation::Lie {
                at,
                value,
                wide,
                big_endian,
            } => {
                let width = if *wide { 8 } else { 4 };
                if bytes.len() >= width {
                    let at = position(*at, bytes.len() - width + 1);
                    let encoded: Vec<u8> = match (wide, big_endian) {
                        (true, false) => value.to_le_bytes().to_vec(),
                        (true, true) => value.to_be_bytes().to_vec(),
                        (false, false) => (*value as u32).to_le_bytes().to_vec(),
                        (false, true) => (*value as u32).to_be_bytes().to_vec(),
                    };
                    bytes[at..at + width].copy_from_slice(&encoded);
                }
            }
            Mutation::Set { at, byte } => {
                if !bytes.is_empty() {
                    let at = position(*at, bytes.len());
                    bytes[at] = *byte;
                }
            }
        }
    }
}

/// A mutation anywhere in a file of up to `len` bytes, with its positions biased towards the
/// first `header` bytes (where lengths and offsets live).
fn mutation(len: usize, header: usize) -> impl Strategy<Value = Mutation> {
    let len = len.max(1);
    let header = header.clamp(1, len);
    let at = prop_oneof![3 => 0..header, 2 => 0..len];
    prop_oneof![
        (at.clone(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (at.clone(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (at.clone(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (0..len + 1).prop_map(|at| Mutation::Truncate { at }),
        (
            at.clone(),
            prop::sample::select(LIES.to_vec()),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(at, value, wide, big_endian)| Mutation::Lie {
                at,
                value,
                wide,
                big_endian
            }),
        (at, any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
    ]
}

/// A hostile version of `valid`: one to four mutations of it (positions biased to its first
/// `header` bytes), or, one time in ten, random bytes.
pub fn hostile(valid: Vec<u8>, header: usize) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    prop_oneof![
        9 => proptest::collection::vec(mutation(len, header), 1..5).prop_map(move |mutations| {
            let mut bytes = valid.clone();
            for mutation in &mutations {
                mutation.apply(&mut bytes);
            }
            bytes
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

/// What a reader's run over hostile input found.
#[derive(Debug, Default)]
pub struct Report {
    /// Cases tried.
    pub cases: u32,
    /// Cases the reader accepted.
    pub accepted: u32,
    /// Cases the reader refused with an error.
    pub refused: u32,
}

/// Throws [`cases`] hostile versions of `valid` (see [`hostile`]) at `read`, each written to a
/// file called `name` in a scratch directory. Every call must return within `timeout`, must not
/// panic, and every error's message must name the file (its path or its name).
///
/// # Panics
/// On the first case that breaks one of these rules, with the mutated bytes' length and the
/// reader's panic or error; proptest shrinks it first.
pub fn check_reader<T, E, F>(name: &str, valid: Vec<u8>, header: usize, timeout: Duration, read: F) -> Report
where
    E: Display,
    F: Fn(&Path) -> Result<T, E> + Send + Sync + Clone + 'static,
    T: 'static,
{
    // The directory is not named after the file, so that an error naming only the directory
    // does not pass for one naming the file.
    let dir = crate::scratch("hostile");
    let path: PathBuf = dir.join(name);
    let deadline = Instant::now() + budget();
    let mut runner = runner();
    let report = std::sync::Mutex::new(Report::default());
    let result = runner.run(&hostile(valid, header), |bytes| {
        if Instant::now() > deadline {
            return Ok(());
        }
        std::fs::write(&path, &bytes).expect("scratch file");
        let (sender, receiver) = mpsc::channel();
        let read = read.clone();
        let target = path.clone();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                read(&target).map(|_| ()).map_err(|error| error.to_string())
            }));
            let _ = sender.send(outcome);
        });
        let outcome = receiver.recv_timeout(timeout).map_err(|_| {
            TestCaseError::fail(format!(
                "{name}: the reader did not return within {timeout:?} ({} bytes)",
                bytes.len()
            ))
        })?;
        let mut report = report.lock().unwrap();
        report.cases += 1;
        match outcome {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(message)) => {
                report.refused += 1;
                let file = path.file_name().unwrap().to_string_lossy();
                if !message.contains(file.as_ref()) {
                    return Err(TestCaseError::fail(format!(
                        "{name}: the error does not name the file: {message}"
                    )));
                }
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(TestCaseError::fail(format!(
                    "{name}: the reader panicked on {} bytes: {message}",
                    bytes.len()
                )));
            }
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let report = report.into_inner().unwrap();
    eprintln!(
        "hostile {name}: {} cases, {} accepted, {} refused",
        report.cases, report.accepted, report.refused
    );
    report
}

/// Throws [`cases`] hostile versions of `valid` at `check`, which returns an error describing
/// any broken rule (for inputs that are not files: request bodies). Returns the cases tried.
///
/// # Panics
/// On the first case `check` fails, after proptest has shrunk it.
pub fn check_bytes(name: &str, valid: Vec<u8>, header: usize, check: impl Fn(&[u8]) -> Result<(), String>) -> u32 {
    let deadline = Instant::now() + budget();
    let mut runner = runner();
    let tried = std::cell::Cell::new(0u32);
    let result = runner.run(&hostile(valid, header), |bytes| {
        if Instant::now() > deadline {
            return Ok(());
        }
        tried.set(tried.get() + 1);
        check(&bytes).map_err(|message| TestCaseError::fail(format!("{name}: {message}")))
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    eprintln!("hostile {name}: {} cases", tried.get());
    tried.get()
}
