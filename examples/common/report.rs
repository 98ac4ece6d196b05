//! How the examples end on an error: one line on standard error, the error and each source it
//! does not already quote, and a failing exit code.

use std::process::ExitCode;

/// `SUCCESS`, or the error printed as [`sentence`] and `FAILURE`.
pub fn exit<T>(result: Result<T, Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", sentence(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources as one line: "what failed: why".
pub fn sentence(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
