#!/usr/bin/env python3
"""transformers' outputs for the real SmolLM2-135M-Instruct GGUF, for burn-distill's tests.

Reads the file scripts/fetch_smollm2.sh fetches and writes tests/fixtures/smollm2/:
- reference.json: chat conversations, the prompt text transformers' `apply_chat_template`
  renders for them and its token ids; the greedy continuation of 32 tokens (transformers'
  `generate`, do_sample=False); token ids of test strings (Unicode, whitespace, code) and of
  excerpts of the bundled corpus (the Jargon File); xxh3-64 hashes of every tensor as the
  `gguf` package dequantises it;
- last_logits.f32: the logits at the last prompt position of each conversation
  (little-endian f32, conversations one after another, 49 152 each).

Token ids: transformers' GGUF tokenizer leaves out the `smollm` pre-tokenizer (digits split one
by one, as in SmolLM2's own tokenizer.json and in llama.cpp), which changes the ids where a run
of whitespace meets a digit ("\n\n   1." ends its whitespace token one space early). The
reference ids come from transformers' tokenizer with that pre-tokenizer restored; when
`llama_cpp` is installed the script checks that llama.cpp tokenizes every string the same way,
and it records how many excerpts transformers' unmodified GGUF tokenizer gets differently.

The model is loaded with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`
(dequantised to f32) and the tokenizer with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.

    pip install torch transformers gguf xxhash numpy
    python3 scripts/make_smollm2_fixtures.py "$(bash scripts/fetch_smollm2.sh)"
"""
import gzip
import json
import pathlib
import sys

import gguf
import numpy as np
import torch
import xxhash
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "smollm2"
CORPUS = ROOT / "data" / "text" / "jargon-4.4.7.txt.gz"
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain the jargon term \"hacker\" in one sentence."}],
]
TEST_STRINGS = [
    "Hello, world!",
    "  two leading spaces, and trailing ones   ",
    "tabs\tand\nnew\n\nlines\r\nwindows",
    "numbers 1234567, 3.14159 and 2026-12-03",
    "fn main() {\n    println!(\"{}\", vec![1, 2, 3].len());\n}\n",
    "def f(x):\n\treturn x ** 2  # square\n",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 日本語, 한국어, emoji 🦀👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]


def main():
    model_path = pathlib.Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    as_converted = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 dtype=torch.float32).eval()
    corpus = gzip.open(CORPUS, "rt", encoding="utf-8").read()
    excerpts = [corpus[start:start + 3000] for start in (0, 250_000, 700_000, 1_200_000, 1_550_000)]

    reference = {"conversations": CONVERSATIONS, "prompts": [], "prompt_ids": [], "greedy": []}
    last_logits = []
    for conversation in CONVERSATIONS:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
            # Greedy decoding is only comparable where the best token wins clearly: refuse a
            # conversation whose continuation passes a near tie (transformers' own cached and
            # uncached passes can disagree there).
            steps = model(out).logits[0, len(ids) - 1:-1]
            top2 = steps.topk(2, dim=-1).values
            margin = (top2[:, 0] - top2[:, 1]).min().item()
        assert margin > 0.02, f"{conversation}: a near tie ({margin}) in the greedy continuation"
        reference.setdefault("greedy_min_margin", []).append(margin)
        reference["prompts"].append(text)
        reference["prompt_ids"].append(ids)
        reference["greedy"].append(out[0, len(ids):].tolist())
        reference.setdefault("greedy_text", []).append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
        last_logits.append(logits.numpy().astype("<f4"))
    reference["test_strings"] = TEST_STRINGS
    reference["test_ids"] = [tokenizer.encode(s, add_special_tokens=True) for s in TEST_STRINGS]
    reference["excerpts"] = excerpts
    reference["excerpt_ids"] = [tokenizer.encode(s, add_special_tokens=True) for s in excerpts]
    assert all(excerpts), "an excerpt is empty: the corpus is shorter than its offsets"
    reference["excerpts_transformers_gguf_tokenizes_differently"] = sum(
        as_converted.encode(s, add_special_tokens=True) != ids for s, ids in zip(excerpts, reference["excerpt_ids"]))
    try:
        from llama_cpp import Llama
    except ImportError:
        Llama = None
    if Llama is not None:
        vocab = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        for text, ids in zip(TEST_STRINGS + excerpts, reference["test_ids"] + reference["excerpt_ids"]):
            assert vocab.tokenize(text.encode(), add_bos=False, special=True) == ids, f"llama.cpp differs on {text!r}"
        reference["llama_cpp_agrees"] = True
    reader = gguf.GGUFReader(str(model_path))
    reference["hashes"] = {
        t.name: xxhash.xxh3_64_intdigest(gguf.quants.dequantize(t.data, t.tensor_type).astype("<f4").tobytes())
        for t in reader.tensors
    }
    (OUT / "reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1))
    np.concatenate(last_logits).tofile(OUT / "last_logits.f32")
    print("greedy:", reference["greedy_text"])
    print("wrote", OUT)


if __name__ == "__main__":
    main()
