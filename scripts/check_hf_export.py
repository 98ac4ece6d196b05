#!/usr/bin/env python3
"""Checks a directory written by `examples/export_hf.rs` with transformers: it loads as
`AutoModelForCausalLM` / `AutoTokenizer`, and its logits and token ids equal those of
transformers' own loading of the original GGUF file.

    python3 scripts/check_hf_export.py EXPORTED_DIR ORIGINAL.gguf
"""
import pathlib
import sys

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

exported, original = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
torch.set_num_threads(2)
ours = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
reference = AutoModelForCausalLM.from_pretrained(original.parent, gguf_file=original.name, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(exported)
gguf_tokenizer = AutoTokenizer.from_pretrained(original.parent, gguf_file=original.name)
# transformers' GGUF tokenizer leaves out the smollm pre-tokenizer (see make_smollm2_fixtures.py).
gguf_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
messages = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
ids = tokenizer.encode(text, add_special_tokens=False)
assert ids == gguf_tokenizer.encode(text, add_special_tokens=False), "token ids differ"
with torch.no_grad():
    a = ours(torch.tensor([ids])).logits
    b = reference(torch.tensor([ids])).logits
    answer = ours.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
diff = (a - b).abs().max().item()
print(f"max |logit difference| over {len(ids)} positions: {diff:.3g}")
print("greedy answer of the exported model:", repr(tokenizer.decode(answer, skip_special_tokens=True)))
assert diff < 1e-4, diff
