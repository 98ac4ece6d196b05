pub mod fused;
pub mod losses;
pub mod relations;
pub mod rows;
