#!/usr/bin/env python3
"""Prefill/decode disaggregation on a two-GPU host, in one run:

1. the floor: NCCL's own send/recv between GPU 0 and GPU 1, and the two GPU links (NCCL,
   copy engines) alone and during GEMMs (sala-nccl-bandwidth);
2. the cluster (redis-server, router, a prefill worker on GPU 0, a decode worker on GPU 1) on
   the 9B shape with random weights answers prompts of each length; its greedy tokens, TTFT,
   and the state transfer (bytes, wire time, exposed time) are recorded from the client and the
   workers' logs;
3. the decode worker is killed while a state is on its way: the request must fail promptly, the
   prefill worker must free it, and after a new decode worker comes up the next request succeeds;
4. the same prompts on one GPU without disaggregation (sala-generate): tokens must be equal.

    source bundle/env.sh
    python3 bench/pd_transfer.py --bundle bundle --lengths 32768,262144,1048576 --out results.json

The bundle holds bin/ (sala-router, sala-prefill, sala-decode, sala-client, sala-generate,
sala-nccl-bandwidth, redis-server), 9b/ (config.json) and small/ (a tokenizer).
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "cluster"))
from sala_cluster import Cluster, log_tail  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def metrics(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def log_lines(path, msg):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("{"):
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                if j.get("msg") == msg:
                    out.append(j)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--lengths", default="32768,262144,1048576")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kill-length", type=int, default=262144, help="prompt of the kill-during-transfer run")
    ap.add_argument("--seed", type=int, default=1, help="random weights")
    ap.add_argument("--state-transport", default="gpu", choices=["gpu", "nccl"],
                    help="the prefill worker's --state_transport: gpu (copy engines on one host) or nccl")
    ap.add_argument("--skip-kill", action="store_true", help="leave out the kill-during-transfer run")
    ap.add_argument("--skip-single-gpu", action="store_true", help="leave out the single-GPU comparison")
    ap.add_argument("--skip-floor", action="store_true",
                    help="leave out the NCCL floor (sala-nccl-bandwidth): no fraction of it is then computed")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    bundle = os.path.abspath(args.bundle)
    binaries = os.path.join(bundle, "bin")
    lengths = [int(x) for x in args.lengths.split(",")]
    max_context = max(lengths + [args.kill_length]) + args.new_tokens + 64
    work = tempfile.mkdtemp(prefix="sala-pd-")
    # The 9B shape's config with the small model's tokenizer (ids past it decode to nothing).
    model = os.path.join(work, "9b")
    shutil.copytree(os.path.join(bundle, "9b"), model)
    for f in os.listdir(os.path.join(bundle, "small")):
        if f.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
            shutil.copy(os.path.join(bundle, "small", f), model)
    result = {"lengths": lengths, "new_tokens": args.new_tokens}

    def save():  # after every phase, so that a cut-off run still leaves its numbers
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    if args.skip_floor:  # the GPU's name all the same; no reference is measured
        result["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                       capture_output=True, text=True).stdout.strip()
    else:
        log("== NCCL floor")
        floor_path = os.path.join(work, "nccl.json")
        subprocess.run([os.path.join(binaries, "sala-nccl-bandwidth"), "--total_gib=8", f"--out={floor_path}"],
                       check=True, stdout=subprocess.DEVNULL, timeout=180)
        with open(floor_path) as f:
            result["nccl_floor"] = json.load(f)
        result["gpu"] = result["nccl_floor"]["gpu"]
        log(json.dumps(result["nccl_floor"]["sizes"]))
        log(json.dumps(result["nccl_floor"].get("prefill_chunk")))

    prompts = {}
    for n in sorted(set(lengths + [args.kill_length, 32768])):
        rng = random.Random(n)
        path = os.path.join(work, f"ids-{n}.txt")
        with open(path, "w") as f:
            f.write(",".join(str(rng.randrange(10, 73000)) for _ in range(n)))
        prompts[n] = path

    cluster = Cluster(model, bin_dir=binaries, prefill=1, decode=1, log_dir=os.path.join(work, "logs"),
                      gpus=[0, 1], router_args=[f"--max_context={max_context}", "--lease=900", "--max_attempts=1"],
                      worker_args=["--backend=cuda", f"--random_weights_seed={args.seed}", f"--max_context={max_context}"],
                      prefill_args=[f"--state_transport={args.state_transport}"], decode_args=["--state_memory_bytes=80000000000"])
    cluster.start(timeout=300)

    def ask(n, timeout=1800):
        cmd = [os.path.join(binaries, "sala-client"), f"--address={cluster.grpc_address}", "complete",
               f"--token-ids-file={prompts[n]}", "--greedy", f"--max-new-tokens={args.new_tokens}", "--ignore-eos",
               "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
        return p.returncode, lines, p.stderr

    runs = []
    prefill_log = os.path.join(cluster.log_dir, "prefill-0.log")
    decode_log = os.path.join(cluster.log_dir, "decode-0.log")
    for n in lengths:
        log(f"== cluster, {n} tokens")
        code, lines, err = ask(n)
        if code != 0:
            raise RuntimeError(f"{n} tokens: {err}")
        final = lines[0]["final"]
        sent = log_lines(prefill_log, "prefill done")[-1]
        received = log_lines(decode_log, "state received")[-1]
        runs.append({"prompt_tokens": n, "tokens": [int(t) for t in lines[0]["token_ids"]],
                     "ttft_seconds": final["timings"]["time_to_first_token_seconds"],
                     "prefill_seconds": float(sent["prefill_seconds"]), "transport": sent["transport"],
                     "state_bytes": int(sent["state_bytes"]),
                     "transfer_exposed_seconds": float(sent["exposed_seconds"]),
                     "sender_wire_seconds": float(sent["wire_seconds"]),
                     "sender_wire_gb_per_s": float(sent["wire_gb_per_s"]),
                     "receiver_wire_seconds": float(received["wire_seconds"]),
                     "receiver_wire_gb_per_s": float(received["wire_gb_per_s"])})
        log(json.dumps({k: v for k, v in runs[-1].items() if k != "tokens"}))
        result["cluster"] = runs
        save()

    if args.skip_kill:
        cluster.stop()
    else:
        kill_during_transfer(args, cluster, ask, result)
        save()
    if args.skip_single_gpu:
        return 0

    log("== one GPU, no disaggregation")
    for run in runs:
        n = run["prompt_tokens"]
        out = os.path.join(work, f"ref-{n}.json")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
        subprocess.run([os.path.join(binaries, "sala-generate"), f"--model={model}", "--backend=cuda",
                        f"--random_weights_seed={args.seed}", f"--max_context={max_context}",
                        f"--token_ids_file={prompts[n]}", "--greedy", f"--max_new_tokens={args.new_tokens}",
                        "--ignore_eos", "--quiet", f"--json_out={out}"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        with open(out) as f:
            ref = json.load(f)
        run["single_gpu_ttft_seconds"] = ref["timings"]["ttft_seconds"] if "timings" in ref else ref["ttft_seconds"]
        run["tokens_equal_single_gpu"] = ref["tokens"] == run["tokens"]
        run["ttft_ratio_vs_single_gpu"] = run["ttft_seconds"] / run["single_gpu_ttft_seconds"]
        run["exposed_fraction_of_ttft"] = run["transfer_exposed_seconds"] / run["ttft_seconds"]
        if "nccl_floor" in result:
            floor = max(s["nccl_send_recv_gb_per_s"] for s in result["nccl_floor"]["sizes"])
            run["sender_wire_fraction_of_nccl"] = run["sender_wire_gb_per_s"] / floor
            run["receiver_wire_fraction_of_nccl"] = run["receiver_wire_gb_per_s"] / floor
        log(json.dumps({k: v for k, v in run.items() if k != "tokens"}))
        save()
    kill = result.get("kill_during_transfer")
    ok = all(r["tokens_equal_single_gpu"] for r in runs) and (
        kill is None or (kill["next_request_ok"] and kill["prefill_freed_state"] and kill["client_exit_code"] != 0))
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


def kill_during_transfer(args, cluster, ask, result):
    """Kills the decode worker while a state is on its way; a new one must then serve."""
    log(f"== kill the decode worker during a {args.kill_length}-token transfer")
    prefill_metrics = cluster.prefills[0].metrics_url
    failures_before = sum(v for k, v in metrics(prefill_metrics).items() if k.startswith("sala_state_transfer_failures_total"))
    outcome = {}
    t = threading.Thread(target=lambda: outcome.update(r=ask(args.kill_length, timeout=600)))
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline and metrics(prefill_metrics).get("sala_num_requests_running", 0) < 1:
        time.sleep(0.05)
    time.sleep(2.0)  # some chunks in, the rest still to come
    victim = cluster.decodes[0]
    victim.kill9()
    killed_at = time.time()
    t.join(600)
    code, _, err = outcome["r"]
    heard_after = time.time() - killed_at
    freed = False
    deadline = time.time() + 60
    while time.time() < deadline:
        if metrics(prefill_metrics).get("sala_num_requests_running", 1) == 0:
            freed = True
            break
        time.sleep(0.1)
    failures_after = sum(v for k, v in metrics(prefill_metrics).items() if k.startswith("sala_state_transfer_failures_total"))
    # A new decode worker on GPU 1, as Kubernetes would restart the pod.
    cluster.decodes.remove(victim)
    cluster.killed = [victim]
    replacement = cluster._worker("decode", 1)
    cluster.decodes.append(replacement)
    cluster.wait_ready(300)
    time.sleep(3)  # the router's registry view drops the dead worker
    code_after, lines_after, err_after = ask(32768)
    result["kill_during_transfer"] = {
        "client_exit_code": code, "client_error": err.strip().splitlines()[-1] if err.strip() else "",
        "client_heard_after_seconds": heard_after, "prefill_freed_state": freed,
        "transfer_failures_counted": failures_after - failures_before,
        "next_request_ok": code_after == 0, "next_request_error": err_after.strip()[-300:] if code_after else ""}
    if code_after:  # the router's view of the failure, kept with the numbers
        result["kill_during_transfer"]["router_log_tail"] = log_tail(cluster.router.log_path)
    log(json.dumps(result["kill_during_transfer"]))
    result["cluster_stop_codes"] = cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
