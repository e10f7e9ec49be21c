"""``kvlink demo``: the main job, end to end on one machine.

A prefill worker process runs a tiny Kimi-Linear-shaped model's prefill on a long prompt and
streams its cache layer by layer through kvlink's transport (paced; over the link lab when run
as root, else loopback) to a decode worker process, which restores it and continues greedy
decoding. A second request extends the first prompt: both sides hit their prefix pools, so only
the new tokens are computed and moved. Every generated token and logit is checked against an
uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import tempfile
import time

import torch

from kvlink.config import parse_rate


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _Worker:
    def __init__(self, argv: list[str]):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def send(self, **msg) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"worker exited ({self.proc.wait()}):\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def reference(family: str, prompts: list[list[int]], steps: int) -> list[dict]:
    """The same requests in one process, no transfer: a prompt that extends the previous one
    continues its cache (as the workers' prefix pools make them do)."""
    from transformers import DynamicCache

    from kvlink.demo.worker import build, greedy, logits_digest

    model, config, _, _ = build(family)
    out, cache, prev = [], None, []
    for prompt in prompts:
        if cache is None or prompt[:len(prev)] != prev:
            cache, prev = DynamicCache(config=config), []
        with torch.no_grad():
            logits = model(torch.tensor([prompt[len(prev):]]), cache=cache, use_cache=True).logits
        first = int(logits[0, -1].argmax())
        # decode from a copy, so the cache holds the prompt alone for the next request
        tokens, step_logits = greedy(model, copy.deepcopy(cache), first, steps)
        out.append({"first": first, "tokens": tokens, "digest": logits_digest(step_logits)})
        prev = prompt
    return out


def run(family: str = "kimi_linear", tokens: int = 2048, extra: int = 256, steps: int = 16, rate: str = "800mbit",
        link: str = "1gbit", lab: bool | None = None, out=print) -> bool:
    from kvlink.demo.worker import POOL_BLOCK
    from kvlink.transport import lab as linklab

    if tokens % POOL_BLOCK:
        raise ValueError(f"--tokens must be a multiple of {POOL_BLOCK} (the first prompt's end is a state checkpoint)")
    why = linklab.unavailable_reason()
    use_lab = why is None if lab is None else lab
    gen = torch.Generator().manual_seed(7)
    first = torch.randint(3, 256, (tokens,), generator=gen).tolist()
    prompts = [first, first + torch.randint(3, 256, (extra,), generator=gen).tolist()]
    t_start = time.monotonic()

    def say(text: str) -> None:
        out(f"[{time.monotonic() - t_start:6.1f}s] {text}")

    out(f"kvlink demo: tiny {family} model, prompt of {tokens} tokens then a follow-up of +{extra}, "
        f"{steps} decode steps")
    if use_lab:
        say(f"link: lab veth pair between two network namespaces, shaped to {link}; sends paced to {rate}")
    else:
        say(f"link: loopback ({why or 'lab turned off'}); sends paced to {rate}")
    with contextlib.ExitStack() as stack:
        prefix_a = prefix_b = []
        host = "127.0.0.1"
        if use_lab:
            lab_ = stack.enter_context(linklab.LinkLab(parse_rate(link)))
            prefix_a, prefix_b = ["ip", "netns", "exec", lab_.ns_a], ["ip", "netns", "exec", lab_.ns_b]
            host = lab_.addr_b
        cmd = [sys.executable, "-m", "kvlink.demo.worker"]
        decode = _Worker([*prefix_b, *cmd, "decode", "--family", family, "--host", host])
        stack.callback(decode.close)
        port = decode.read()["port"]
        prefill = _Worker([*prefix_a, *cmd, "prefill", "--family", family, "--dest", f"{host}:{port}", "--rate", rate])
        stack.callback(prefill.close)
        prefill.read()
        say("workers up: prefill and decode processes, each with the model, a paged cache and a prefix pool")
        say("computing the uninterrupted single-process reference ...")
        expected = reference(family, prompts, steps)
        all_ok = True
        for i, prompt in enumerate(prompts, 1):
            rid = f"req-{i}"
            decode.send(op="expect", request=rid, prompt=prompt)
            matched = decode.read()["matched"]
            say(f"{rid}: {len(prompt)} tokens; decode pool holds {matched}, so prefill computes and sends "
                f"{len(prompt) - matched}")
            prefill.send(op="prefill", request=rid, prompt=prompt, send_from=matched)
            while "event" in (msg := prefill.read()):
                if sys.stdout.isatty():
                    print(f"\r    prefill layers streamed: {msg['layer'] + 1}", end="", flush=True)
            if sys.stdout.isatty():
                print()
            pf = msg
            decode.send(op="decode", request=rid, prompt=prompt, first_token=pf["first_token"], steps=steps)
            dc = decode.read()
            all_ok &= _report(say, rid, pf, dc, expected[i - 1], parse_rate(rate))
        say("result: " + ("tokens and logits identical to the uninterrupted run for every request"
                          if all_ok else "MISMATCH against the uninterrupted run"))
        return all_ok


def _report(say, rid: str, pf: dict, dc: dict, want: dict, rate: float | None) -> bool:
    prefill_s = pf["prefill_end"] - pf["prefill_start"]
    last_done = max(dc["layer_done"].values())
    first_done = min(dc["layer_done"].values())
    tail = max(0.0, last_done - pf["prefill_end"])
    transfer = last_done - min(pf["layer_saved"].values())
    restore = dc["restored"] - dc["landed"]
    mbps = dc["bytes"] * 8 / max(transfer, 1e-9) / 1e6
    ok = pf["first_token"] == want["first"] and dc["tokens"] == want["tokens"] and dc["digest"] == want["digest"]
    say(f"{rid}: reused {pf['reused']} tokens, computed {pf['computed']}; moved {_fmt_bytes(dc['bytes'])} in "
        f"{len(dc['layer_done'])} layers over {transfer * 1e3:.0f} ms of streaming, {mbps:.0f} Mbit/s on average "
        f"(paced to {'unlimited' if rate is None else f'{rate / 1e6:.0f} Mbit/s'}; the stream waits for prefill, "
        f"not for the link)")
    link = pf["link"]
    pacing = "unpaced" if link["pacing_bps"] is None else f"paced at {link['pacing_bps'] / 1e6:.0f} Mbit/s"
    say(f"{rid}: link as the sender saw it: {pacing} ({link['phase']}), RTT {link['rtt_ms'] or 0:.2f} ms, "
        f"{link['retransmits']} retransmits")
    say(f"{rid}: time to first decode token {prefill_s + tail + restore:.3f} s = prefill {prefill_s:.3f} s "
        f"+ transfer after prefill {tail * 1e3:.1f} ms + restore {restore * 1e3:.1f} ms")
    say(f"{rid}: streaming: first layer landed {max(0.0, pf['prefill_end'] - first_done) * 1e3:.0f} ms before "
        f"prefill ended, the last {tail * 1e3:.1f} ms after it")
    say(f"{rid}: generated {dc['tokens'][:8]}... ({len(dc['tokens'])} tokens): "
        f"{'tokens and logits identical to' if ok else 'DIFFERENT from'} the uninterrupted run")
    return ok
