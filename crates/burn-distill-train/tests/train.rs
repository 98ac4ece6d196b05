//! Integration tests for burn-distill-train.
