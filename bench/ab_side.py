"""One side of `python -m bench.ab`: a pool of whichever tree is first on PYTHONPATH, and the official
SDKs calling through it (the shim, or at its gateway), driven over stdin and stdout by one line each:

    run N     ->  the N calls' durations in seconds, as a JSON list
    cpu       ->  CPU seconds so far of the caller (this process), the gateway, the broker and the workers
    (end of stdin: the pool is closed and the process ends)

Run by `bench.ab` as `python -c` with this file's text, so that it imports nothing of the tree it came
from: only `broker` (the tree under test) and the SDKs. It keeps to the API every tree since the shim
has had (`Pool(profiles=, http=)`, `broker.shim.Anthropic/OpenAI(pool=, pool_profile=)`)."""

import contextlib
import json
import sys
import time

import anthropic
import openai
import psutil

import broker
from broker import Pool, shim

ASK = [{"role": "user", "content": "hi"}]


def read_all(stream):
    with stream:
        return sum(1 for _ in stream)


def calls(a, o):
    return {
        "count": lambda: a.messages.count_tokens(model="claude-bench", messages=ASK),
        "tiny": lambda: read_all(a.messages.create(model="claude-bench", max_tokens=8, messages=ASK, stream=True)),
        "chat": lambda: read_all(
            o.chat.completions.create(model="gpt-bench", max_completion_tokens=1, messages=ASK, stream=True)
        ),
    }


def cpu(pool):
    def seconds(proc):
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    broker_proc = psutil.Process(pool.pid)
    children = broker_proc.children(recursive=True)

    def role(name):
        total = 0.0
        for child in children:
            with contextlib.suppress(psutil.Error):
                if name in " ".join(child.cmdline()):
                    total += seconds(child)
        return total

    return {"caller": seconds(psutil.Process()), "gateway": role("broker.http.gateway"), "broker": seconds(broker_proc),
            "worker": role("worker.")}  # fmt: skip


def main():
    path, call, url = sys.argv[1:4]
    profiles = {"anthropic": {"kind": "anthropic", "base_url": url, "min_workers": 1, "max_workers": 1},
                "openai": {"kind": "openai", "base_url": url + "/v1", "min_workers": 1, "max_workers": 1}}  # fmt: skip
    with Pool(profiles=profiles, **({"http": "127.0.0.1:0"} if path == "gateway" else {})) as pool:
        if path == "gateway":
            a = anthropic.Anthropic(base_url=pool.http_url, api_key="unused", max_retries=0,
                                    default_headers={"x-isopool-profile": "anthropic"})  # fmt: skip
            o = openai.OpenAI(base_url=pool.http_url + "/v1", api_key="unused", max_retries=0,
                              default_headers={"x-isopool-profile": "openai"})  # fmt: skip
        else:
            a, o = shim.Anthropic(pool=pool, pool_profile="anthropic"), shim.OpenAI(pool=pool, pool_profile="openai")
        one = calls(a, o)[call]
        print(json.dumps({"ready": broker.__file__}), flush=True)
        for line in sys.stdin:
            word, *args = line.split()
            if word == "run":
                spent = []
                for _ in range(int(args[0])):
                    t0 = time.perf_counter()
                    one()
                    spent.append(time.perf_counter() - t0)
                print(json.dumps(spent), flush=True)
            elif word == "cpu":
                print(json.dumps(cpu(pool)), flush=True)
        a.close()
        o.close()


main()
