pub mod losses;
