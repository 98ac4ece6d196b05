//! Writing a file so that a reader sees the old one or the new one, never half of either.
//!
//! Both helpers write to a temporary file of this process's own in the target's directory
//! (`tempfile`), flush it to disk, rename it over the target and, where the platform allows,
//! flush the directory so the rename survives a crash. A write that fails leaves the target as it
//! was and removes the temporary file. The file ends up readable by all (0644 on Unix, as
//! `File::create` under the usual umask would make it), not private like a temporary file.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// The directory burn-distill keeps downloaded and default files in: `$BURN_DISTILL_CACHE`,
/// else `$XDG_CACHE_HOME/burn-distill`, else `~/.cache/burn-distill`; `None` without any of
/// those variables.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("BURN_DISTILL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("burn-distill")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/burn-distill")))
}

/// Writes `path` through `write`, which gets a buffered writer on a temporary file.
///
/// # Errors
/// What `write` returns, or the I/O error of creating, flushing or renaming the file.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>) -> io::Result<()> {
    let temporary = temporary_in(path)?;
    {
        let mut writer = BufWriter::new(temporary.as_file());
        write(&mut writer)?;
        writer.flush()?;
    }
    finish(temporary, path)
}

/// Writes `path` through `save`, which gets the temporary file's path to write to (for writers
/// that take a path: burn-store's stores, plotters' bitmaps) and may replace the file there.
///
/// # Errors
/// What `save` returns, or `io_error` of the I/O error of creating, flushing or renaming the file.
pub fn save_atomically<E>(
    path: &Path,
    save: impl FnOnce(&Path) -> Result<(), E>,
    io_error: impl Fn(io::Error) -> E,
) -> Result<(), E> {
    let temporary = temporary_in(path).map_err(&io_error)?;
    save(temporary.path())?;
    finish(temporary, path).map_err(io_error)
}

/// A private temporary file beside `path`, named after it and ending in its extension (writers
/// such as plotters choose the format by it).
fn temporary_in(path: &Path) -> io::Result<NamedTempFile> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |name| name.to_string_lossy());
    let suffix = match path.extension() {
        Some(extension) => format!(".partial.{}", extension.to_string_lossy()),
        None => ".partial".to_string(),
    };
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(&suffix)
        .tempfile_in(dir)
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes the (possibly rewritten) temporary file, renames it over `path`, flushes the directory.
fn finish(temporary: NamedTempFile, path: &Path) -> io::Result<()> {
    // A writer given the path may have replaced the file: reopen it by name.
    File::open(temporary.path())?.sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(temporary.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    temporary.persist(path).map_err(|error| error.error)?;
    // Not every platform can open a directory; the rename itself is done either way.
    let _ = File::open(parent(path)).and_then(|dir| dir.sync_all());
    Ok(())
}
