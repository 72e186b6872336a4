#!/usr/bin/env python3
"""Starts a SALA cluster on loopback: redis-server, one router, N prefill and M decode workers.

    sala_cluster.py --model models/small                      # run until Ctrl-C
    sala_cluster.py --model models/small --prompt-file F      # answer one prompt, streaming, then stop

Every process logs JSON lines to <log-dir>/<name>.log. The same Cluster class starts the
clusters of the integration tests.
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


_taken = set()


def free_port():
    """A port that is free now and outside the kernel's ephemeral range: a port from bind(0) comes
    from that range, so an outgoing connection elsewhere on the machine can take it before the
    service that was given it binds."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65000) if not low <= p <= high and p not in _taken]
    for _ in range(200 if candidates else 0):
        port = random.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class Process:
    def __init__(self, name, cmd, log_dir, env=None):
        self.name, self.cmd = name, cmd
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "ab")
        full_env = dict(os.environ, OMP_WAIT_POLICY="passive", **(env or {}))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=15):
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Cluster:
    def __init__(self, model, bin_dir=None, prefill=1, decode=1, log_dir=None, chunk_size=None,
                 router_args=(), worker_args=(), decode_args=(), gpus=None, prefill_args=()):
        self.model = os.path.abspath(model)
        self.bin_dir = bin_dir or os.path.join(ROOT, "build", "services")
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="sala-cluster-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.n_prefill, self.n_decode = prefill, decode
        self.chunk_size = chunk_size
        self.router_args, self.worker_args, self.decode_args = list(router_args), list(worker_args), list(decode_args)
        self.prefill_args = list(prefill_args)
        # GPUs handed out to workers in turn (prefill workers first): a worker computes on its own,
        # the first of its CUDA_VISIBLE_DEVICES.
        self.gpus = list(gpus or [])
        self.redis = None
        self.router = None
        self.prefills, self.decodes = [], []
        self.redis_port = free_port()
        self.http_port = free_port()
        self.grpc_port = free_port()

    @property
    def http(self):
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self):
        return f"127.0.0.1:{self.grpc_port}"

    def start_redis(self):
        self.redis = Process("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], self.log_dir)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def _worker(self, role, index):
        port, metrics = free_port(), free_port()
        binary = os.path.join(self.bin_dir, f"sala-{role}")
        cmd = [binary, f"--model={self.model}", f"--listen=127.0.0.1:{port}", f"--worker_id={role}-{index}",
               f"--redis=127.0.0.1:{self.redis_port}", f"--metrics_listen=127.0.0.1:{metrics}", *self.worker_args]
        if self.chunk_size:
            cmd.append(f"--chunk_size={self.chunk_size}")
        cmd += self.decode_args if role == "decode" else self.prefill_args
        env = None
        if self.gpus:
            # A replacement worker (index past the count) takes the GPU of the one it replaces.
            turn = index % self.n_prefill if role == "prefill" else self.n_prefill + index % self.n_decode
            # The worker's own GPU first (the one it computes on), then the others: a GPU the
            # process can see is one its copy engines reach over NVLink.
            own = turn % len(self.gpus)
            env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in self.gpus[own:] + self.gpus[:own])}
        p = Process(f"{role}-{index}", cmd, self.log_dir, env)
        p.address, p.metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics"
        return p

    def start(self, timeout=60):
        self.start_redis()
        self.prefills = [self._worker("prefill", i) for i in range(self.n_prefill)]
        self.decodes = [self._worker("decode", i) for i in range(self.n_decode)]
        self.router = Process("router", [os.path.join(self.bin_dir, "sala-router"), f"--model={self.model}",
                                         f"--grpc_listen=127.0.0.1:{self.grpc_port}",
                                         f"--http_listen=127.0.0.1:{self.http_port}",
                                         f"--redis=127.0.0.1:{self.redis_port}", *self.router_args], self.log_dir)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=60, prefill=None, decode=None):
        """Until the router's /health is 200 (it sees a usable prefill and decode worker)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in [self.router, *self.prefills, *self.decodes]:
                if not p.alive() and p not in getattr(self, "killed", []):
                    raise RuntimeError(f"{p.name} exited ({p.proc.returncode}); {p.log_path} ends with:\n"
                                       + log_tail(p.log_path))
            try:
                with urllib.request.urlopen(self.http + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ready after {timeout}s; logs in {self.log_dir}")

    def stop(self):
        """Stops every process gracefully; returns {name: exit code}."""
        codes = {}
        for p in [self.router, *self.prefills, *self.decodes, self.redis]:
            if p is not None:
                codes[p.name] = p.stop()
        return codes

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def stream_completion(base_url, prompt, max_tokens=64, seed=1, out=sys.stdout):
    """Streams one completion over the OpenAI API; returns (text, ttft_seconds, usage)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(base_url + "/v1/completions", body, {"Content-Type": "application/json"})
    start, ttft, text, usage = time.time(), None, "", None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.time() - start
                    text += choice["text"]
                    out.write(choice["text"])
                    out.flush()
    return text, ttft, usage


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers")
    ap.add_argument("--decode", type=int, default=1, help="decode workers")
    ap.add_argument("--bin-dir", help="where sala-router, sala-prefill, sala-decode are (default build/services)")
    ap.add_argument("--log-dir")
    ap.add_argument("--chunk-size", type=int)
    ap.add_argument("--prompt-file", help="answer this prompt (streaming), print the TTFT, and stop")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--gpus", help="comma-separated GPU ids handed to the workers in turn, prefill first")
    ap.add_argument("--worker-arg", action="append", default=[],
                    help="extra flag for every worker, e.g. --worker-arg=--backend=cuda (repeatable)")
    args = ap.parse_args()
    cluster = Cluster(args.model, args.bin_dir, args.prefill, args.decode, args.log_dir, args.chunk_size,
                      worker_args=args.worker_arg, gpus=args.gpus.split(",") if args.gpus else None)
    print(f"starting: redis, router, {args.prefill} prefill, {args.decode} decode (logs in {cluster.log_dir})",
          file=sys.stderr)
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    print(f"ready: HTTP {cluster.http}  gRPC {cluster.grpc_address}", file=sys.stderr)
    try:
        if args.prompt_file:
            with open(args.prompt_file) as f:
                prompt = f.read()
            text, ttft, usage = stream_completion(cluster.http, prompt, args.max_tokens)
            print(file=sys.stderr)
            print(f"prompt tokens: {usage['prompt_tokens']} | generated: {usage['completion_tokens']} | "
                  f"TTFT: {ttft:.3f} s (through the cluster)", file=sys.stderr)
        else:
            signal.sigwait([signal.SIGINT, signal.SIGTERM])
    finally:
        codes = cluster.stop()
        print("stopped: " + ", ".join(f"{k} exit {v}" for k, v in codes.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
