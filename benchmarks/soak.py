"""Soak: a live server under twice the request rate it can serve, with hostile and clumsy clients.

    python benchmarks/soak.py                        # 10 minutes on the tiny demo model
    python benchmarks/soak.py --duration 60          # a short run

`loraplex serve` runs in a subprocess on the tiny demo model and its three adapters (alpha, beta,
gamma). The soak first measures the rate the server saturates at (closed loop, for
--saturation-seconds), then sends requests at --rate-factor times that rate (Poisson arrivals) for
--duration seconds, mixing:
  - clean greedy completions on the base model and the adapters, from a fixed pool of (prompt,
    model) pairs whose outputs were recorded alone, one at a time, before the load: each clean 200
    must give exactly that output;
  - streamed requests whose client leaves after the first event;
  - bad requests (malformed JSON, wrong fields, unknown models, lone surrogates, oversized stop
    lists, an invalid adapter upload);
  - adapter uploads (gamma's files under a fresh name), requests on them, and their deletes.
It reports requests, status codes, mismatches, client errors, and the server's RSS (baseline after
the reference pass, peak, and after the load once idle), and exits 1 on any 5xx, any mismatch or
an RSS that did not come back (within --rss-slack of the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from live_server import free_port, wait_until_serving

ADMIN_KEY = "soak-admin-key"
MAX_TOKENS = 16



def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, url: str, base: str, adapter_dir: Path, rng: random.Random) -> None:
        self.url, self.base, self.adapter_dir, self.rng = url, base, adapter_dir, rng
        self.models = [base, "alpha", "beta", "gamma"]
        self.statuses: collections.Counter[str] = collections.Counter()
        self.mismatches: list[str] = []
        self.client_errors: collections.Counter[str] = collections.Counter()
        self.reference: dict[tuple[str, str], str] = {}
        self.uploaded: list[str] = []
        self.serial = 0

    def body(self, prompt: str, model: str, **extra) -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                **extra}

    async def record_references(self, client: httpx.AsyncClient, pool: list[tuple[str, str]]) -> None:
        for prompt, model in pool:  # one at a time: each runs alone
            resp = await client.post(f"{self.url}/v1/completions", json=self.body(prompt, model))
            resp.raise_for_status()
            self.reference[(prompt, model)] = resp.json()["choices"][0]["text"]

    async def clean(self, client: httpx.AsyncClient) -> None:
        prompt, model = self.rng.choice(list(self.reference))
        resp = await client.post(f"{self.url}/v1/completions", json=self.body(prompt, model))
        self.count("clean", resp)
        if resp.status_code == 200 and resp.json()["choices"][0]["text"] != self.reference[(prompt, model)]:
            self.mismatches.append(f"{model} {prompt[:30]!r}: {resp.json()['choices'][0]['text']!r}")

    async def disconnect(self, client: httpx.AsyncClient) -> None:
        prompt, model = self.rng.choice(list(self.reference))
        async with client.stream("POST", f"{self.url}/v1/completions",
                                 json=self.body(prompt, model, stream=True, max_tokens=64)) as resp:
            self.count("disconnect", resp)
            async for _ in resp.aiter_lines():
                break  # the client leaves after the first event

    async def bad(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.randrange(6)
        url = f"{self.url}/v1/completions"
        if kind == 0:
            resp = await client.post(url, content=b'{"model": "alpha", "prompt": ', headers={"content-type":
                                                                                            "application/json"})
        elif kind == 1:
            resp = await client.post(url, json=self.body("x", "alpha", max_tokens=-3))
        elif kind == 2:
            resp = await client.post(url, json=self.body("x", f"no-such-model-{self.rng.random()}"))
        elif kind == 3:
            raw = b'{"model": "\\ud800", "prompt": "x"}'  # a lone surrogate, echoed back in the error
            resp = await client.post(url, content=raw, headers={"content-type": "application/json"})
        elif kind == 4:
            resp = await client.post(url, json=self.body("x", "beta", stop_token_ids=list(range(100_000))))
        else:
            files = [("files", ("adapter_config.json", b'{"r": "eight"}')), ("files", ("x.bin", b"\x80\x04"))]
            resp = await client.post(f"{self.url}/v1/adapters", data={"name": f"bad{self.rng.randrange(10**6)}"},
                                     files=files, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        self.count("bad", resp)
        if resp.status_code < 400:
            self.mismatches.append(f"bad request kind {kind} was accepted ({resp.status_code})")

    async def upload(self, client: httpx.AsyncClient) -> None:
        self.serial += 1
        name = f"soak{self.serial}"
        files = [("files", (f.name, f.read_bytes())) for f in sorted((self.adapter_dir / "gamma").iterdir())]
        resp = await client.post(f"{self.url}/v1/adapters", data={"name": name}, files=files,
                                 headers={"authorization": f"Bearer {ADMIN_KEY}"})
        self.count("upload", resp)
        if resp.status_code == 201:
            self.uploaded.append(name)
            prompt = self.rng.choice([p for p, m in self.reference if m == "gamma"])
            resp = await client.post(f"{self.url}/v1/completions", json=self.body(prompt, name))
            self.count("on-upload", resp)
            if resp.status_code == 200 and resp.json()["choices"][0]["text"] != self.reference[(prompt, "gamma")]:
                self.mismatches.append(f"{name} (gamma's files) {prompt[:30]!r}")

    async def delete(self, client: httpx.AsyncClient) -> None:
        if not self.uploaded:
            return
        name = self.uploaded.pop(self.rng.randrange(len(self.uploaded)))
        resp = await client.delete(f"{self.url}/v1/adapters/{name}", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        self.count("delete", resp)

    def count(self, action: str, resp: httpx.Response) -> None:
        self.statuses[f"{action} {resp.status_code}"] += 1

    async def act(self, client: httpx.AsyncClient, action: str) -> None:
        try:
            await getattr(self, action)(client)
        except httpx.HTTPError as e:
            self.client_errors[f"{action}: {type(e).__name__}"] += 1


ACTIONS = {"clean": 0.72, "disconnect": 0.08, "bad": 0.10, "upload": 0.05, "delete": 0.05}


async def saturation(soak: Soak, client: httpx.AsyncClient, seconds: float, concurrency: int) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            prompt, model = soak.rng.choice(list(soak.reference))
            resp = await client.post(f"{soak.url}/v1/completions", json=soak.body(prompt, model))
            done += resp.status_code == 200

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - start)


async def run(url: str, base: str, adapter_dir: Path, pid: int, args) -> dict:
    rng = random.Random(args.seed)
    soak = Soak(url, base, adapter_dir, rng)
    words = ["the", "a", "lighthouse", "keeper", "walked", "along", "rocky", "shore", "every", "morning",
             "while", "gulls", "cried", "above"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) for _ in range(args.pool)]
    pool = [(p, m) for p in prompts for m in soak.models][: args.pool * 2]
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        await soak.record_references(client, pool)
        await asyncio.sleep(2)
        baseline = rss_mib(pid)
        rate = args.rate_factor * await saturation(soak, client, args.saturation_seconds, args.concurrency)
        print(f"saturation x {args.rate_factor}: {rate:.1f} requests/s for {args.duration} s", flush=True)
        tasks: set[asyncio.Task] = set()
        peak, sent = baseline, 0
        names, weights = list(ACTIONS), list(ACTIONS.values())
        start = last_report = time.monotonic()
        while (now := time.monotonic()) - start < args.duration:
            task = asyncio.create_task(soak.act(client, rng.choices(names, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            await asyncio.sleep(rng.expovariate(rate))
            if now - last_report >= 10:
                peak = max(peak, rss_mib(pid))
                last_report = now
                print(f"  {now - start:5.0f} s: {sent} sent, {len(tasks)} in flight, RSS {rss_mib(pid):.0f} MiB, "
                      f"5xx {sum(n for k, n in soak.statuses.items() if k.split()[-1].startswith('5'))}, "
                      f"mismatches {len(soak.mismatches)}", flush=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in list(soak.uploaded):
            await client.delete(f"{url}/v1/adapters/{name}", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        await asyncio.sleep(args.settle_seconds)
        after = rss_mib(pid)
    return {"requests": sent, "rate": rate, "statuses": dict(sorted(soak.statuses.items())),
            "client_errors": dict(soak.client_errors), "mismatches": soak.mismatches[:20],
            "num_mismatches": len(soak.mismatches), "rss_mib": {"baseline": baseline, "peak": peak, "after": after}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--rate-factor", type=float, default=2.0)
    parser.add_argument("--saturation-seconds", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients measuring saturation")
    parser.add_argument("--pool", type=int, default=12, help="prompts in the clean pool (x 2 models each)")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--settle-seconds", type=float, default=15)
    parser.add_argument("--rss-slack", type=float, default=1.25, help="after / baseline allowed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    from loraplex.models.demo import DEMO_ADAPTERS, write_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_demo_model(tmp / "demo")
        port = free_port()
        command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir), "--port", str(port),
                   "--dtype", "float32", "--device", "cpu", "--data-dir", str(tmp / "home"),
                   "--admin-key", ADMIN_KEY, "--max-waiting", "128", "--max-loras", "4", "--shutdown-grace", "5"]
        for name in DEMO_ADAPTERS:
            command += ["--adapter", f"{name}={model_dir / 'adapters' / name}"]
        log_path = tmp / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
            url = f"http://127.0.0.1:{port}"
            try:
                base = wait_until_serving(url)
                result = asyncio.run(run(url, base, model_dir / "adapters", proc.pid, args))
            finally:
                proc.send_signal(signal.SIGTERM)
                result_code = proc.wait(60)
        result["server_exit"] = result_code
        result["server_log_lines"] = len(log_path.read_text(errors="replace").splitlines())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    five_xx = sum(n for key, n in result["statuses"].items() if key.split()[-1].startswith("5"))
    rss = result["rss_mib"]
    ok = five_xx == 0 and result["num_mismatches"] == 0 and rss["after"] <= rss["baseline"] * args.rss_slack
    print("soak: " + ("passed" if ok else "FAILED") + f" ({five_xx} 5xx, {result['num_mismatches']} mismatches, RSS "
          f"{rss['baseline']:.0f} -> peak {rss['peak']:.0f} -> {rss['after']:.0f} MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
