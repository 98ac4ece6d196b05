#!/usr/bin/env python3
"""A tiny random Llama for burn-distill-model's Llama tests, with transformers' outputs.

Writes, under tests/fixtures/llama/:
- hf/: the model in the Hugging Face layout (config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json with a ChatML template): 2 blocks, width 64, 4 query and 2 key/value
  heads (grouped-query attention), SwiGLU 96, untied head, vocabulary 320 (a byte-level BPE
  trained on the Jargon File's first 200 kB, three control tokens);
- tiny-{f32,q8_0,q4_0,q4_1}.gguf: the same weights as llama.cpp writes them (q and k rows
  interleaved per head, norms in F32, every other tensor in the named type), with the
  tokenizer as GGUF metadata (`gpt2` model, `smollm` pre-tokenizer, merges, token types,
  chat template);
- hf-sharded/: the same Llama saved in shards of at most 200 kB with their index;
- hf-bf16/, hf-f16/: the same Llama stored in bf16 and f16 (their logits: transformers in f32 on
  the rounded weights);
- hf-qwen2/: a tiny Qwen2 (q/k/v biases, tied head) in the Hugging Face layout, and
  tiny-qwen2-q8_0.gguf the same as llama.cpp writes it (no row interleaving, biases in F32);
- tiny.json: token-id prompts and, for the Hugging Face models and each GGUF file loaded by
  transformers (`from_pretrained(dir, gguf_file=...)`, dequantised to f32), the logits at every
  position; greedy continuations; xxh3-64 hashes of every tensor as the `gguf` package
  dequantises it (to check our dequantisation bit for bit); token ids transformers' tokenizer
  gives for test strings, from tokenizer.json and from the GGUF metadata; the chat template
  rendered by `apply_chat_template`.

    pip install torch transformers gguf tokenizers xxhash numpy
    python3 scripts/make_llama_fixtures.py
"""
import gzip
import json
import pathlib
import shutil

import gguf
import numpy as np
import torch
import xxhash
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "llama"
CORPUS = ROOT / "data" / "text" / "jargon-4.4.7.txt.gz"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEST_STRINGS = [
    "Hello, world!",
    "The Jargon File is a glossary of hacker slang.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines",
    "numbers 1234567 and 3.14159",
    "fn main() { println!(\"{}\", 42); }",
    "Unicode: café, naïve, 日本語, emoji 🦀",
    "<|im_start|>user\nhi<|im_end|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is a hacker?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Define foo.  "},
     {"role": "assistant", "content": "A placeholder."}, {"role": "user", "content": "And bar?"}],
]


def train_tokenizer():
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()[:200_000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def permute(weights, heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary pairs interleaved)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name):
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, index, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{index}.{LAYER_NAMES[module]}.{kind}"


def write_gguf(path, model, config, tokenizer, qtype, arch="llama"):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().numpy().astype(np.float32)
        # Only llama's rows are interleaved; Qwen2 keeps Hugging Face's order.
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, config.num_key_value_heads)
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), data)
        else:
            quantized = gguf.quants.quantize(data, kind)
            writer.add_tensor(gguf_name(name), quantized, raw_shape=quantized.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_hashes(path):
    reader = gguf.GGUFReader(str(path))
    hashes = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("<f4")
        hashes[tensor.name] = xxhash.xxh3_64_intdigest(values.tobytes())
    return hashes


def logits_of(model, prompts):
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].tolist() for p in prompts]


def greedy(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def randomise(model):
    """Initialised norms are all ones and biases zero; random ones check that each is applied
    where it belongs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))


def main():
    torch.manual_seed(11)
    if OUT.exists():
        shutil.rmtree(OUT)
    hf_dir = OUT / "hf"
    hf_dir.mkdir(parents=True)
    tokenizer = train_tokenizer()
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    randomise(model)
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "add_bos_token": False, "chat_template": TEMPLATE}, indent=2))

    prompts = [[5, 77, 120, 9], [300, 17, 17, 42, 250, 3, 101], [260]]
    fixture = {"prompts": prompts, "hf": {"logits": logits_of(model, prompts),
                                          "greedy": greedy(model, prompts[1], 12)}}
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    model.save_pretrained(OUT / "hf-sharded", safe_serialization=True, max_shard_size="200KB")
    for label, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        stored = LlamaForCausalLM(config).eval()
        stored.load_state_dict(model.state_dict())
        stored.to(dtype).save_pretrained(OUT / f"hf-{label}", safe_serialization=True)
        # A fresh f32 model with the rounded weights: `.to(dtype)` would also round the rotary
        # frequencies, which a loader casting weights to f32 does not see.
        rounded = LlamaForCausalLM(config).eval()
        rounded.load_state_dict({k: v.to(torch.float32) for k, v in stored.state_dict().items()})
        fixture[label] = {"logits": logits_of(rounded, prompts)}
    qwen2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"})).eval()
    randomise(qwen2)
    qwen2.save_pretrained(OUT / "hf-qwen2", safe_serialization=True)
    fixture["qwen2"] = {"logits": logits_of(qwen2, prompts)}
    write_gguf(OUT / "tiny-qwen2-q8_0.gguf", qwen2, qwen2.config, tokenizer, gguf.GGMLQuantizationType.Q8_0,
               arch="qwen2")
    loaded = AutoModelForCausalLM.from_pretrained(OUT, gguf_file="tiny-qwen2-q8_0.gguf", dtype=torch.float32).eval()
    fixture["qwen2_gguf"] = {"logits": logits_of(loaded, prompts)}
    fixture["tokens_hf"] = {s: hf_tok.encode(s, add_special_tokens=True) for s in TEST_STRINGS}
    fixture["chat_hf"] = [hf_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                          for c in CONVERSATIONS]

    types = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}
    for label, qtype in types.items():
        name = f"tiny-{label}.gguf"
        write_gguf(OUT / name, model, config, tokenizer, qtype)
        loaded = AutoModelForCausalLM.from_pretrained(OUT, gguf_file=name, dtype=torch.float32).eval()
        fixture[label] = {"logits": logits_of(loaded, prompts), "hashes": dequantized_hashes(OUT / name)}
        if label == "q4_1":
            gguf_tok = AutoTokenizer.from_pretrained(OUT, gguf_file=name)
            fixture["tokens_gguf"] = {s: gguf_tok.encode(s, add_special_tokens=True) for s in TEST_STRINGS}
            fixture["chat_gguf"] = [gguf_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                                    for c in CONVERSATIONS]
    fixture["test_strings"] = TEST_STRINGS
    fixture["conversations"] = CONVERSATIONS
    (OUT / "tiny.json").write_text(json.dumps(fixture))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
