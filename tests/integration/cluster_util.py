"""Helpers for the cluster tests: start clusters, call both fronts, read metrics and Redis."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from common import BIN, MODEL, SOURCE

sys.path.insert(0, os.path.join(SOURCE, "tools", "cluster"))
from sala_cluster import Cluster  # noqa: E402

SERVICES = os.path.join(os.path.dirname(BIN), "services")


def make_cluster(**kw):
    return Cluster(MODEL, bin_dir=SERVICES, **kw)


def http_json(cluster, path, body=None, raw=None, timeout=300):
    """POST (or GET without body); returns (status, parsed JSON)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(cluster.http + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def http_stream(cluster, path, body, timeout=300):
    """Streaming request; returns (events, saw_done)."""
    body = dict(body, stream=True)
    req = urllib.request.Request(cluster.http + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    events, done = [], False
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.headers.get("Content-Type", "").startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[6:]))
    return events, done


def client(cluster, *args, timeout=300):
    """Runs sala-client against the router; returns (exit code, stdout lines as JSON, stderr)."""
    cmd = [os.path.join(BIN, "sala-client"), f"--address={cluster.grpc_address}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.strip().startswith("{")]
    return p.returncode, lines, p.stderr


def client_error_code(stderr):
    for line in stderr.splitlines():
        if line.startswith("{"):
            return json.loads(line)["error"]["code"]
    return None


def metrics(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def redis(cluster, *args):
    """One Redis command over RESP; returns the decoded reply (bulk strings, arrays, ints)."""
    with socket.create_connection(("127.0.0.1", cluster.redis_port), timeout=2) as s:
        cmd = f"*{len(args)}\r\n" + "".join(f"${len(str(a).encode())}\r\n{a}\r\n" for a in args)
        s.sendall(cmd.encode())
        f = s.makefile("rb")  # closed below: an open file keeps the socket alive

        def read():
            line = f.readline().decode().rstrip("\r\n")
            kind, rest = line[0], line[1:]
            if kind in "+-":
                return rest
            if kind == ":":
                return int(rest)
            if kind == "$":
                n = int(rest)
                if n < 0:
                    return None
                data = f.read(n + 2)[:-2]
                return data.decode()
            if kind == "*":
                return [read() for _ in range(int(rest))]
            raise ValueError(line)
        with f:
            return read()


def sessions_with_status(cluster, status):
    keys = redis(cluster, "KEYS", "sala:session:*") or []
    return [k for k in keys if redis(cluster, "HGET", k, "status") == status]


def wait_for(predicate, timeout=20, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
