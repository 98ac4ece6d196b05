pub mod fused;
pub mod losses;
