"""Writes tests/fixtures/chrf.json: sacrebleu's chrF (its defaults: character 6-grams, beta 2,
whitespace removed, no word n-grams) of hypothesis / reference pairs, sentence by sentence and
for the whole corpus. The reference for `burn_distill_train::chrf`.

    pip install sacrebleu==2.6.0
    python3 scripts/make_chrf_fixtures.py
"""
import json
from pathlib import Path

import sacrebleu
from sacrebleu.metrics import CHRF

PAIRS = [
    ("The capital of France is Paris.", "The capital of France is Paris."),
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("cruft: excess code that does nothing", "Cruft is unpleasant substance; excess, superfluous junk."),
    ("a", "a"),
    ("ab", "abc"),
    ("", "nothing here"),
    ("something", ""),
    ("", ""),
    ("   spaced    out\ttext\n", "spaced out text"),
    ("naïve café – 東京 🎉", "naive cafe - 東京 🎉"),
    ("fn main() { println!(\"hi\"); }", "fn main() { println!(\"hello\"); }"),
    ("aaaaaaa", "aaa"),
    ("A hacker is a person who enjoys exploring the details of programmable systems.",
     "Hacker: a person who enjoys exploring the details of programmable systems and stretching their capabilities."),
]


def main():
    metric = CHRF()
    sentences = [metric.sentence_score(h, [r]).score for h, r in PAIRS]
    corpus = metric.corpus_score([h for h, _ in PAIRS], [[r for _, r in PAIRS]]).score
    out = {
        "sacrebleu": sacrebleu.__version__,
        "signature": str(metric.get_signature()),
        "pairs": [{"hypothesis": h, "reference": r, "chrf": s} for (h, r), s in zip(PAIRS, sentences)],
        "corpus": corpus,
    }
    path = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chrf.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}: corpus chrF {corpus:.4f}")


if __name__ == "__main__":
    main()
