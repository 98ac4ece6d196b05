#!/usr/bin/env python3
"""The peers of `examples/llama_bench.rs` on the same GGUF and the same shapes, 2 threads:
transformers (f32 on PyTorch's CPU backend, the file dequantised) and, when `llama_cpp` is
installed (`pip install llama-cpp-python`), llama.cpp on the quantised file itself.
Prints one JSON object.

    python3 scripts/bench_llama_peers.py "$(bash scripts/fetch_smollm2.sh)" [--repeats 3]
"""
import argparse
import json
import pathlib
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = ("The Jargon File is a comprehensive compendium of hacker slang illuminating many aspects of "
        "hackish tradition, folklore, and humor. ") * 40


# The Jargon File terms of the answer benchmark (the same in examples/llama_bench.rs).
ANSWER_TERMS = ["cruft", "kluge", "hack", "foo", "bar", "frob", "grok", "nybble", "bogus", "crufty", "daemon",
                "deadlock", "elegant", "feature", "flame", "glitch", "guru", "hacker", "kludge", "lossage", "magic",
                "mung", "newbie", "nuke", "patch", "phase", "quux", "RTFM", "spam", "tweak", "wizard", "zen"]


def best(repeats, run):
    return min(run() for _ in range(repeats))


def transformers_figures(path, repeats):
    torch.set_num_threads(2)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    corpus = tokenizer.encode(TEXT, add_special_tokens=False)

    def tokens(rows, length):
        return torch.tensor([[corpus[(r * length + i) % len(corpus)] for i in range(length)] for r in range(rows)])

    def timed(fn):
        t = time.perf_counter()
        with torch.no_grad():
            fn()
        return time.perf_counter() - t

    prefill = best(repeats, lambda: timed(lambda: model(tokens(1, 512), logits_to_keep=1)))

    def decode(batch):
        prompts = torch.tensor([corpus[r * 3:r * 3 + 16] for r in range(batch)])
        def run():
            with torch.no_grad():
                t = time.perf_counter()
                out = model(prompts, use_cache=True, logits_to_keep=1)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                first = time.perf_counter()
                for _ in range(63):
                    out = model(token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                return 63 * batch / (time.perf_counter() - first)
        return max(run() for _ in range(repeats))

    forward = best(repeats, lambda: timed(lambda: model(tokens(8, 256))))

    # Answering chat prompts (llama_bench's "answers"): the chat template, left-padded batches of
    # 16, `generate` with its KV cache, greedy, exactly 64 new tokens per prompt.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f'Explain the jargon term "{term}".'}],
                                           tokenize=False, add_generation_prompt=True) for term in ANSWER_TERMS]

    def answers():
        t = time.perf_counter()
        for first in range(0, len(texts), 16):
            batch = tokenizer(texts[first:first + 16], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        return time.perf_counter() - t

    answer_seconds = best(repeats, answers)
    return {
        "load_seconds": load,
        "prefill_512_tokens_per_s": 512 / prefill,
        "decode_batch1_tokens_per_s": decode(1),
        "decode_batch8_tokens_per_s": decode(8),
        "forward_8x256_tokens_per_s": 2048 / forward,
        "answers_32x64_tokens_per_s": len(ANSWER_TERMS) * 64 / answer_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def llama_cpp_figures(path, repeats):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    started = time.perf_counter()
    llm = Llama(model_path=str(path), n_threads=2, n_batch=512, n_ctx=1024, verbose=False, logits_all=False)
    load = time.perf_counter() - started
    corpus = llm.tokenize(TEXT.encode(), add_bos=False)

    def prefill():
        llm.reset()
        t = time.perf_counter()
        llm.eval(corpus[:512])
        return time.perf_counter() - t

    def decode():
        llm.reset()
        llm.eval(corpus[:16])
        t = time.perf_counter()
        for _ in range(63):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        return 63 / (time.perf_counter() - t)

    return {
        "load_seconds": load,
        "prefill_512_tokens_per_s": 512 / best(repeats, prefill),
        "decode_batch1_tokens_per_s": max(decode() for _ in range(repeats)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=pathlib.Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"transformers_f32": transformers_figures(args.model, args.repeats),
                      "llama_cpp": llama_cpp_figures(args.model, args.repeats)}, indent=2))


if __name__ == "__main__":
    main()
