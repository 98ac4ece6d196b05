"""Load benchmark: N concurrent clients for a bounded time against our server and against
llama.cpp's (llama-cpp-python) on the same GGUF, in one run, on 127.0.0.1 only. Prints
requests/s, answer tokens/s and p50/p99 latency of each, and ours as a ratio of llama.cpp's.

    cargo build --release --features flex --example serve
    venv=$(bash scripts/python_peers.sh)
    $venv/bin/python scripts/bench_serve.py --model "$(bash scripts/fetch_smollm2.sh)" \
        --clients 1 4 --seconds 30 --max-tokens 32

Each client sends greedy chat requests for "Explain the jargon term X." (X from a fixed list) one
after another until the time is up; a request in flight when time runs out is waited for and
counted. Both servers get 2 threads (the machine's cores); ours batches concurrent requests
into one decode, llama-cpp-python's server answers one request at a time.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import openai

TERMS = ["cruft", "foo", "hack", "kludge", "grok", "daemon", "wizard", "bogus", "frob", "mung",
         "nybble", "elegant", "feature", "glitch", "guru", "hairy"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"no server on port {port} after {seconds} s")


async def client(base, model, max_tokens, deadline, index, latencies, tokens):
    # The official client, as users call these servers.
    http = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    i = index
    while time.time() < deadline:
        messages = [{"role": "user", "content": f"Explain the jargon term \"{TERMS[i % len(TERMS)]}\"."}]
        start = time.perf_counter()
        response = await http.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        latencies.append(time.perf_counter() - start)
        tokens.append(response.usage.completion_tokens)
        i += 1


async def load(base, model, clients, seconds, max_tokens):
    latencies, tokens = [], []
    start = time.perf_counter()
    deadline = time.time() + seconds
    await asyncio.gather(*(client(base, model, max_tokens, deadline, c, latencies, tokens) for c in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--serve", default="target/release/examples/serve")
    args = parser.parse_args()
    alias = "SmolLM2-135M-Instruct"
    servers = {}
    ours = free_port()
    servers["burn-distill"] = (subprocess.Popen(
        [args.serve, "--model", args.model, "--port", str(ours), "--model-id", alias, "--max-batch", "16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), ours)
    theirs = free_port()
    servers["llama.cpp"] = (subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--host", "127.0.0.1",
         "--port", str(theirs), "--n_threads", "2", "--n_ctx", "2048", "--model_alias", alias],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), theirs)
    results = {}
    try:
        for name, (_, port) in servers.items():
            wait_up(port)
            base = f"http://127.0.0.1:{port}/v1"
            # One warm-up request, not counted.
            openai.OpenAI(base_url=base, api_key="none", timeout=600).chat.completions.create(
                model=alias, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        for clients in args.clients:
            for name, (_, port) in servers.items():
                base = f"http://127.0.0.1:{port}/v1"
                results[(name, clients)] = asyncio.run(load(base, alias, clients, args.seconds, args.max_tokens))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    print(f"| server | clients | requests | requests/s | tokens/s | p50 s | p99 s | tokens/s vs llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        base = results[("llama.cpp", clients)]["tokens_per_s"]
        for name in servers:
            r = results[(name, clients)]
            print(f"| {name} | {clients} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['tokens_per_s'] / base:.2f}x |")
    print(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}))


if __name__ == "__main__":
    main()
