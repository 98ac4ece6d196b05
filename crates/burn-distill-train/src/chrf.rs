//! chrF (Popović, 2015): character n-gram F-score, how close a student's answer is to its
//! teacher's. Computed as sacrebleu's `CHRF()` does with its defaults (character 6-grams,
//! β = 2, whitespace removed, no word n-grams), against which it is tested.

use std::collections::HashMap;

/// Character n-gram orders.
const ORDER: usize = 6;
/// Recall weighs β² = 4 times precision.
const BETA: f64 = 2.0;

/// Match statistics of one or more hypothesis / reference pairs: per order, the hypothesis'
/// n-grams (0 when the reference has none of that order), the reference's, and their matches.
/// Summing them over pairs gives the corpus score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChrfStats {
    counts: [[usize; 3]; ORDER],
}

impl ChrfStats {
    /// The statistics of one pair.
    pub fn of(hypothesis: &str, reference: &str) -> Self {
        let hypothesis: Vec<char> = hypothesis.chars().filter(|c| !c.is_whitespace()).collect();
        let reference: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
        let mut counts = [[0; 3]; ORDER];
        for (order, slot) in counts.iter_mut().enumerate() {
            let n = order + 1;
            let mut reference_grams: HashMap<&[char], usize> = HashMap::new();
            for gram in reference.windows(n) {
                *reference_grams.entry(gram).or_default() += 1;
            }
            let mut hypothesis_grams: HashMap<&[char], usize> = HashMap::new();
            for gram in hypothesis.windows(n) {
                *hypothesis_grams.entry(gram).or_default() += 1;
            }
            let matches = hypothesis_grams
                .iter()
                .map(|(gram, &count)| count.min(reference_grams.get(gram).copied().unwrap_or(0)))
                .sum();
            let hypothesis_count = if reference_grams.is_empty() {
                0
            } else {
                hypothesis.len().saturating_sub(n - 1)
            };
            *slot = [hypothesis_count, reference.len().saturating_sub(n - 1), matches];
        }
        Self { counts }
    }

    /// Adds another pair's statistics (for a corpus score).
    pub fn add(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
    }

    /// The score in `[0, 100]`: precision and recall averaged over the orders both sides have,
    /// then their F-β.
    pub fn score(&self) -> f64 {
        let (mut precision, mut recall, mut orders) = (0.0, 0.0, 0);
        for &[hypothesis, reference, matches] in &self.counts {
            if hypothesis > 0 && reference > 0 {
                precision += matches as f64 / hypothesis as f64;
                recall += matches as f64 / reference as f64;
                orders += 1;
            }
        }
        if orders == 0 {
            return 0.0;
        }
        let (precision, recall) = (precision / orders as f64, recall / orders as f64);
        if precision + recall == 0.0 {
            return 0.0;
        }
        let factor = BETA * BETA;
        100.0 * (1.0 + factor) * precision * recall / (factor * precision + recall)
    }
}

/// chrF of one hypothesis against one reference, in `[0, 100]` (sacrebleu's `sentence_chrf`).
pub fn chrf(hypothesis: &str, reference: &str) -> f64 {
    ChrfStats::of(hypothesis, reference).score()
}

/// Corpus chrF of `(hypothesis, reference)` pairs: their statistics summed, then scored
/// (sacrebleu's `corpus_chrf`); 0 for no pairs.
pub fn corpus_chrf<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let mut total = ChrfStats::default();
    for (hypothesis, reference) in pairs {
        total.add(&ChrfStats::of(hypothesis, reference));
    }
    total.score()
}
