pub mod fused;
pub mod losses;
pub mod rows;
