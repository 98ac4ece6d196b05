//! The offline teacher-output cache: run a teacher once, train from its outputs many times.

mod build;
mod format;
mod read;
mod teacher;

pub use build::{CacheBuildOptions, CacheReport, build_cache, partial_path, write_top_k_cache};
pub use format::{CacheHeader, CacheMode, FORMAT_VERSION};
pub use read::{ExpectedSource, TeacherCache, dense_from_top_k};
pub use teacher::CachedTeacher;
