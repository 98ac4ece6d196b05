//! Print a student's lineage: the teacher, the endpoint, the terms and the data it was
//! distilled from, as its run directory recorded them (`lineage.json`), and whether the
//! transfer set on disk is still the one it was trained on.
//!
//! ```sh
//! cargo run --release --features flex --example lineage -- runs/distill_chat-harvested
//! ```

#[path = "common/report.rs"]
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use burn_distill::serve::Lineage;
use clap::Parser;

/// Print where a student's training data came from.
#[derive(Parser, Debug)]
struct Args {
    /// The student's run directory.
    run_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.run_dir.join(burn_distill::serve::LINEAGE_FILE).exists() {
        eprintln!(
            "error: {} has no {}: it was not trained on a harvested transfer set (distill_chat --transfer-set writes one)",
            args.run_dir.display(),
            burn_distill::serve::LINEAGE_FILE
        );
        return ExitCode::FAILURE;
    }
    report::exit(
        Lineage::read(&args.run_dir)
            .map(|lineage| {
                println!("student:      {}", args.run_dir.display());
                println!("{lineage}");
                match lineage.verify() {
                    Some(true) => println!("check:        the transfer set on disk has this fingerprint"),
                    Some(false) => {
                        println!("check:        the transfer set on disk has CHANGED since the student was trained")
                    }
                    None => println!("check:        the transfer set is not on this machine"),
                }
            })
            .map_err(Into::into),
    )
}
