"""The cluster as its users meet it: router, prefill and decode workers and redis-server as
real processes on loopback, driven through gRPC (sala-client) and the OpenAI HTTP API."""
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error

from cluster_util import (SERVICES, client, client_error_code, http_json, http_stream, make_cluster, metrics, redis,
                          sessions_with_status, wait_for)
from common import BIN, MODEL, generate, random_ids, require_environment, write_ids


def reference(ids, max_new_tokens):
    """Greedy tokens and text from sala-generate on the same prompt."""
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    generate(f"--token-ids-file={write_ids(ids)}", "--greedy", f"--max-new-tokens={max_new_tokens}",
             "--ignore-eos", "--quiet", f"--json-out={out}")
    with open(out) as f:
        return json.load(f)


@contextlib.contextmanager
def streaming_client(address, *args):
    """sala-client running in the background, its output piped; killed and reaped on the way out so a
    failed assertion does not leave it streaming."""
    proc = subprocess.Popen([os.path.join(BIN, "sala-client"), f"--address={address}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def csv(ids):
    return ",".join(map(str, ids))


class ClusterTest(unittest.TestCase):
    """Tests that share one cluster and leave it healthy."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = make_cluster(prefill=1, decode=1, chunk_size=256).start()

    @classmethod
    def tearDownClass(cls):
        codes = cls.cluster.stop()
        assert all(c == 0 for c in codes.values()), f"graceful stop failed: {codes}"

    def setUp(self):
        require_environment(self)

    def cluster_warnings(self):
        lines = []
        for name in sorted(os.listdir(self.cluster.log_dir)):
            with open(os.path.join(self.cluster.log_dir, name), errors="replace") as f:
                lines += [f"{name}: {l.rstrip()}" for l in f if '"level":"warn' in l or '"level":"error' in l]
        return "\n".join(lines[-40:])

    def assert_workers_idle(self):
        for d in self.cluster.decodes:
            self.assertTrue(wait_for(lambda: (lambda m: m["sala_num_requests_running"] == 0 and
                                              m["sala_num_requests_waiting"] == 0 and
                                              m["sala_state_memory_usage_ratio"] == 0)(metrics(d.metrics_url))),
                            f"{d.name} still holds state: " +
                            str({k: v for k, v in metrics(d.metrics_url).items() if "num_requests" in k or "memory" in k}))
        for p in self.cluster.prefills:
            self.assertTrue(wait_for(lambda: metrics(p.metrics_url)["sala_num_requests_running"] == 0))

    def test_outputs_equal_sala_generate(self):
        ids = random_ids(700, seed=11)
        ref = reference(ids, 24)
        self.assertEqual(len(ref["tokens"]), 24)
        common = ["--greedy", "--max-new-tokens=24", "--ignore-eos", f"--token-ids={csv(ids)}", "--json"]
        code, lines, err = client(self.cluster, "complete", *common)
        self.assertEqual(code, 0, err)
        self.assertEqual([int(t) for t in lines[0]["token_ids"]], ref["tokens"])
        self.assertEqual(lines[0]["text"], ref["text"])
        code, lines, err = client(self.cluster, "generate", *common)
        self.assertEqual(code, 0, err)
        streamed = [int(t) for l in lines if "delta" in l for t in l["delta"].get("token_ids", [])]
        self.assertEqual(streamed, ref["tokens"])
        final = lines[-1]["final"]
        self.assertEqual(final["finish_reason"], "FINISH_REASON_LENGTH")
        self.assertEqual(final["usage"]["prompt_tokens"], 700)
        self.assertGreater(final["timings"]["time_to_first_token_seconds"], 0)
        body = {"prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        status, out = http_json(self.cluster, "/v1/completions", body)
        self.assertEqual(status, 200, out)
        self.assertEqual(out["choices"][0]["text"], ref["text"])
        self.assertEqual(out["usage"], {"prompt_tokens": 700, "completion_tokens": 24, "total_tokens": 724})
        events, done = http_stream(self.cluster, "/v1/completions",
                                   dict(body, stream_options={"include_usage": True}))
        self.assertTrue(done)
        self.assertEqual("".join(c["text"] for e in events for c in e["choices"]), ref["text"])
        self.assertEqual(events[-1]["usage"]["completion_tokens"], 24)
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "length")

    def test_chat_equals_sala_generate(self):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise the document."}]
        f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(messages, f)
        f.close()
        ref = generate(f"--messages-file={f.name}", "--greedy", "--max-new-tokens=12", "--ignore-eos").stdout
        status, out = http_json(self.cluster, "/v1/chat/completions",
                                {"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        self.assertEqual(status, 200, out)
        self.assertEqual(out["object"], "chat.completion")
        self.assertEqual(out["choices"][0]["message"]["content"], ref.rstrip("\n"))
        events, done = http_stream(self.cluster, "/v1/chat/completions",
                                   {"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        self.assertTrue(done)
        self.assertEqual(events[0]["choices"][0]["delta"]["role"], "assistant")
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        self.assertEqual(text, ref.rstrip("\n"))

    def test_stop_strings_cut_the_answer(self):
        ids = random_ids(300, seed=97)
        ref = reference(ids, 24)["text"]
        start = next(i for i in range(4, len(ref) - 3) if ref.find(ref[i:i + 3]) == i)
        stop = ref[start:start + 3]
        body = {"prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop, "never-seen"]}
        status, out = http_json(self.cluster, "/v1/completions", body)
        self.assertEqual(status, 200, out)
        self.assertEqual(out["choices"][0]["text"], ref[:start])
        self.assertEqual(out["choices"][0]["finish_reason"], "stop")
        events, done = http_stream(self.cluster, "/v1/completions", dict(body, stop=stop))
        self.assertTrue(done)
        self.assertEqual("".join(c["text"] for e in events for c in e["choices"]), ref[:start])
        self.assertEqual(events[-1]["choices"][0]["finish_reason"], "stop")
        self.assert_workers_idle()
        for bad in [{"stop": 5}, {"stop": [""]}, {"stop": ["x"] * 9}, {"stop": "x", "keep_session": True}]:
            status, out = http_json(self.cluster, "/v1/completions", dict({"prompt": "hi"}, **bad))
            self.assertEqual(status, 400, (bad, out))

    def test_seeded_sampling_continues_its_stream_across_prefill_and_decode(self):
        # The prefill worker draws the first token, the decode worker the rest: the same tokens as
        # one process drawing all of them with the same seed.
        ids = random_ids(400, seed=17)
        out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        generate(f"--token-ids-file={write_ids(ids)}", "--temperature=0.8", "--top_k=50", "--top_p=0.9", "--seed=1234",
                 "--max-new-tokens=16", "--ignore-eos", "--quiet", f"--json-out={out}")
        with open(out) as f:
            expected = json.load(f)
        body = {"prompt": ids, "max_tokens": 16, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 1234,
                "ignore_eos": True}
        status, got = http_json(self.cluster, "/v1/completions", body)
        self.assertEqual(status, 200, got)
        self.assertEqual(got["choices"][0]["text"], expected["text"])
        greedy = reference(ids, 16)
        self.assertNotEqual(expected["tokens"], greedy["tokens"], "the draw must not be the greedy one")

    def test_64_concurrent_requests_with_mixed_lengths(self):
        def one(i):
            ids = random_ids(20 + (i * 37) % 400, seed=100 + i)
            body = {"prompt": ids, "max_tokens": 8, "temperature": 0.5, "seed": i, "ignore_eos": True}
            if i % 2:
                try:
                    events, done = http_stream(self.cluster, "/v1/completions",
                                               dict(body, stream_options={"include_usage": True}))
                except urllib.error.HTTPError as e:
                    return e.code, e.read().decode(errors="replace")
                response_ids.add(events[0]["id"])
                return 200 if done else 0, events[-1]["usage"]["completion_tokens"]
            status, out = http_json(self.cluster, "/v1/completions", body)
            response_ids.add(out.get("id"))
            return status, out.get("usage", {}).get("completion_tokens", out)
        response_ids = set()
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        # A failure names the errors and what the services logged about them.
        self.assertEqual(results, [(200, 8)] * 64, [r for r in results if r != (200, 8)] and self.cluster_warnings())
        self.assertEqual(len(response_ids), 64, "every request has an id of its own")
        self.assert_workers_idle()

    def test_session_second_turn_equals_whole_conversation(self):
        first, second = random_ids(300, seed=21), random_ids(50, seed=22)
        code, lines, err = client(self.cluster, "complete", f"--token-ids={csv(first)}", "--greedy",
                                  "--max-new-tokens=8", "--ignore-eos", "--keep-session", "--json")
        self.assertEqual(code, 0, err)
        turn1 = [int(t) for t in lines[0]["token_ids"]]
        session = lines[0]["final"]["session_id"]
        self.assertTrue(session)
        code, lines, err = client(self.cluster, "session", f"--session-id={session}")
        self.assertEqual(code, 0, err)
        self.assertEqual(lines[0]["status"], "SESSION_STATUS_DONE")
        self.assertTrue(lines[0]["kept"])
        code, lines, err = client(self.cluster, "complete", f"--token-ids={csv(second)}", "--greedy",
                                  "--max-new-tokens=8", "--ignore-eos", f"--session-id={session}", "--json")
        self.assertEqual(code, 0, err)
        turn2 = [int(t) for t in lines[0]["token_ids"]]
        self.assertEqual(turn2, reference(first + turn1 + second, 8)["tokens"])
        self.assert_workers_idle()  # the second turn did not ask to keep the state
        code, _, err = client(self.cluster, "complete", f"--token-ids={csv(second)}", f"--session-id={session}")
        self.assertEqual(client_error_code(err), "FAILED_PRECONDITION", err)

    def test_cancel_frees_every_worker(self):
        with streaming_client(self.cluster.grpc_address, "generate", f"--token-ids={csv(random_ids(200, seed=31))}",
                              "--request-id=rq-cancel-1", "--max-new-tokens=100000", "--ignore-eos", "--json") as proc:
            for _ in range(3):
                proc.stdout.readline()
            code, lines, err = client(self.cluster, "cancel", "--request-id=rq-cancel-1")
            self.assertEqual(code, 0, err)
            self.assertTrue(lines[0]["cancelled"])
            proc.wait(10)
            self.assertEqual(client_error_code(proc.stderr.read()), "CANCELLED")
            self.assert_workers_idle()
            self.assertTrue(wait_for(lambda: sessions_with_status(self.cluster, "cancelled")))
            code, lines, _ = client(self.cluster, "cancel", "--request-id=rq-cancel-1")
            self.assertFalse(lines[0].get("cancelled", False))

    def test_client_disconnect_frees_every_worker(self):
        before = len(sessions_with_status(self.cluster, "cancelled"))
        body = json.dumps({"prompt": random_ids(200, seed=41), "max_tokens": 100000, "ignore_eos": True,
                           "stream": True}).encode()
        s = socket.create_connection(("127.0.0.1", self.cluster.http_port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 5:
            received += s.recv(4096)
        s.close()
        self.assert_workers_idle()
        self.assertTrue(wait_for(lambda: len(sessions_with_status(self.cluster, "cancelled")) > before))

    def test_bad_input_on_both_fronts(self):
        bad_http = [
            ("/v1/completions", b"{not json", 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": "x"}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400),
            ("/v1/completions", json.dumps({"max_tokens": 3}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "model": "gpt-9"}).encode(), 404),
            ("/v1/completions", json.dumps({"prompt": ""}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": random_ids(17000, seed=1)}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": [1, 99999999]}).encode(), 400),
            # past int32: must not wrap into a valid id (2**32 + 5 is 5 as an int32)
            ("/v1/completions", json.dumps({"prompt": [1, 2**32 + 5]}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "stop_token_ids": [2**32 + 2]}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "top_p": 2}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "n": 2}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "stop": {"a": 1}}).encode(), 400),
            ("/v1/completions", json.dumps({"prompt": "hi", "session_id": "s-nope"}).encode(), 404),
            ("/v1/completions", json.dumps({"prompt": "hi", "stream": True, "top_k": -1}).encode(), 400),
            ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400),
            ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
            ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400),
            ("/v1/nothing", b"{}", 404),
        ]
        for path, raw, want in bad_http:
            status, out = http_json(self.cluster, path, raw=raw)
            self.assertEqual(status, want, (path, raw[:80], out))
            self.assertIn("message", out.get("error", {}), out)
        bad_grpc = [
            (["complete"], "INVALID_ARGUMENT"),
            (["complete", "--prompt=hi", "--model=gpt-9"], "NOT_FOUND"),
            (["complete", f"--token-ids={csv(random_ids(17000, seed=2))}"], "INVALID_ARGUMENT"),
            (["complete", "--token-ids=1,99999999"], "INVALID_ARGUMENT"),
            (["complete", "--prompt=hi", "--temperature=-1"], "INVALID_ARGUMENT"),
            (["complete", "--prompt=hi", "--top-p=0"], "INVALID_ARGUMENT"),
            (["generate", "--prompt=hi", "--max-new-tokens=0"], "INVALID_ARGUMENT"),
            (["complete", "--prompt=hi", "--session-id=s-nope"], "NOT_FOUND"),
            (["session", "--session-id=s-nope"], "NOT_FOUND"),
            (["cancel"], "INVALID_ARGUMENT"),
        ]
        for args, want in bad_grpc:
            code, _, err = client(self.cluster, *args)
            self.assertEqual(code, 3, (args, err))
            self.assertEqual(client_error_code(err), want, (args, err))
        # Still serving.
        status, out = http_json(self.cluster, "/v1/completions", {"prompt": "still there?", "max_tokens": 2})
        self.assertEqual(status, 200, out)
        status, models = http_json(self.cluster, "/v1/models")
        self.assertEqual(models["data"][0]["id"], os.path.basename(self.cluster.model))

    def test_session_passes_through_every_status(self):
        # Every write to Redis, as it happens (statuses can be sub-millisecond on this model).
        monitor = socket.create_connection(("127.0.0.1", self.cluster.redis_port))
        monitor.sendall(b"MONITOR\r\n")
        lines, stop = [], threading.Event()

        def read():
            f = monitor.makefile("rb")
            while not stop.is_set():
                line = f.readline()
                if not line:
                    break
                lines.append(line.decode(errors="replace"))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(0.2)
        code, out, err = client(self.cluster, "complete", f"--token-ids={csv(random_ids(3000, seed=95))}",
                                "--max-new-tokens=20", "--ignore-eos", "--json")
        self.assertEqual(code, 0, err)
        time.sleep(0.5)
        stop.set()
        monitor.close()
        writes = [l for l in lines if '"HSET"' in l and '"sala:session:' in l]
        session = next(l.split('"sala:session:')[1].split('"')[0] for l in writes if '"queued"' in l)
        order = []
        for l in writes:
            if f'"sala:session:{session}"' in l:
                status = l.split('"status" "')[1].split('"')[0]
                if not order or order[-1] != status:
                    order.append(status)
        self.assertEqual(order, ["queued", "prefilling", "transferring", "decoding", "done"])

    def test_metrics_and_health(self):
        with __import__("urllib.request").request.urlopen(self.cluster.http + "/health") as r:
            self.assertEqual(r.status, 200)
        m = metrics(self.cluster.http + "/metrics")
        for name in ["sala_time_to_first_token_seconds_count", "sala_e2e_request_latency_seconds_count",
                     'sala_requests_total{code="ok"}', "sala_redis_up", "sala_prompt_tokens_total"]:
            self.assertIn(name, m)
        self.assertIn('sala_time_to_first_token_seconds_bucket{le="14400"}', m)
        d = metrics(self.cluster.decodes[0].metrics_url)
        self.assertIn("sala_state_transfer_bytes_total", d)
        self.assertIn("sala_inter_token_latency_seconds_count", d)


class FailureTest(unittest.TestCase):
    """Each test breaks something on a cluster of its own."""

    def setUp(self):
        require_environment(self)

    def test_kill_decode_worker_mid_stream(self):
        with make_cluster(prefill=1, decode=2) as c:
            with streaming_client(c.grpc_address, "generate", f"--token-ids={csv(random_ids(100, seed=51))}",
                                  "--max-new-tokens=100000", "--ignore-eos", "--json") as proc:
                for _ in range(3):
                    proc.stdout.readline()
                victim = next(d for d in c.decodes if metrics(d.metrics_url)["sala_num_requests_running"] >= 1)
                victim.kill9()
                start = time.time()
                proc.wait(15)
                self.assertLess(time.time() - start, 10, "the client must hear of the failure promptly")
                self.assertEqual(client_error_code(proc.stderr.read()), "ABORTED")
                self.assertTrue(wait_for(lambda: sessions_with_status(c, "failed")))
                for i in range(4):  # the router routes around the dead worker
                    code, _, err = client(c, "complete", f"--token-ids={csv(random_ids(50, seed=60 + i))}",
                                          "--max-new-tokens=4", "--ignore-eos")
                    self.assertEqual(code, 0, err)
                survivor = next(d for d in c.decodes if d is not victim)
                self.assertGreaterEqual(metrics(survivor.metrics_url)["sala_generation_tokens_total"], 16)
                c.decodes.remove(victim)

    def test_kill_prefill_worker_before_first_token_retries(self):
        with make_cluster(prefill=2, decode=1, chunk_size=128) as c:
            result = {}
            ids = random_ids(3000, seed=71)

            def run():
                result["r"] = http_json(c, "/v1/completions", {"prompt": ids, "max_tokens": 6, "ignore_eos": True})
            t = threading.Thread(target=run)
            t.start()
            busy = []
            self.assertTrue(wait_for(lambda: busy.extend(
                p for p in c.prefills if metrics(p.metrics_url)["sala_num_requests_running"] == 1) or busy, 20, 0.02))
            busy[0].kill9()
            t.join(120)
            status, out = result["r"]
            self.assertEqual(status, 200, out)
            self.assertEqual(out["usage"]["completion_tokens"], 6)
            c.prefills.remove(busy[0])

    def test_redis_stopped_and_restarted_under_traffic(self):
        with make_cluster(prefill=1, decode=1) as c:
            statuses, stop = [], threading.Event()

            def traffic():
                i = 0
                while not stop.is_set():
                    status, _ = http_json(c, "/v1/completions", {"prompt": random_ids(30, seed=i), "max_tokens": 3})
                    statuses.append(status)
                    i += 1
            t = threading.Thread(target=traffic)
            t.start()
            time.sleep(1)
            c.redis.stop()
            time.sleep(3)  # longer than the workers' heartbeat TTL
            during = len(statuses)
            c.start_redis()
            time.sleep(3)
            stop.set()
            t.join(60)
            self.assertGreater(during, 2)
            self.assertGreater(len(statuses), during)
            self.assertEqual(set(statuses), {200})
            self.assertTrue(wait_for(lambda: metrics(c.http + "/metrics")["sala_redis_up"] == 1))
            self.assertTrue(wait_for(lambda: len(redis(c, "SMEMBERS", "sala:workers")) == 2))

    def test_queue_full_is_429_and_resource_exhausted(self):
        with make_cluster(prefill=1, decode=1, router_args=["--max_queue=1"]) as c:
            with streaming_client(c.grpc_address, "generate", "--token-ids=1,5,6", "--max-new-tokens=100000",
                                  "--ignore-eos", "--json", "--request-id=long") as proc:
                proc.stdout.readline()
                status, out = http_json(c, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
                self.assertEqual(status, 429, out)
                self.assertEqual(out["error"]["type"], "rate_limit_error")
                code, _, err = client(c, "complete", "--prompt=hi")
                self.assertEqual(client_error_code(err), "RESOURCE_EXHAUSTED", err)
                client(c, "cancel", "--request-id=long")
                proc.wait(10)

    def test_kept_session_is_freed_when_not_continued(self):
        with make_cluster(prefill=1, decode=1, decode_args=["--kept_session_ttl=1"]) as c:
            code, lines, err = client(c, "complete", f"--token-ids={csv(random_ids(100, seed=91))}",
                                      "--max-new-tokens=2", "--keep-session", "--json")
            self.assertEqual(code, 0, err)
            d = c.decodes[0].metrics_url
            self.assertGreater(metrics(d)["sala_state_memory_usage_ratio"], 0)
            self.assertTrue(wait_for(lambda: metrics(d)["sala_state_memory_usage_ratio"] == 0, 10))
            code, _, err = client(c, "complete", "--token-ids=5,6", f"--session-id={lines[0]['final']['session_id']}")
            self.assertEqual(client_error_code(err), "NOT_FOUND", err)

    def test_state_transport_is_chosen_per_worker_flag(self):
        ids = csv(random_ids(300, seed=95))
        # CPU workers have no GPU path: a GPU link required is a clean, explained failure...
        for mode in ("gpu", "nccl"):
            with make_cluster(prefill=1, decode=1, prefill_args=[f"--state_transport={mode}"]) as c:
                code, _, err = client(c, "complete", f"--token-ids={ids}", "--max-new-tokens=2")
                self.assertNotEqual(code, 0)
                self.assertIn("no GPU path", err)
                self.assertTrue(wait_for(lambda: metrics(c.prefills[0].metrics_url)["sala_num_requests_running"] == 0))
                self.assertTrue(wait_for(lambda: metrics(c.decodes[0].metrics_url)["sala_state_memory_usage_ratio"] == 0))
        # ...and the host path, asked for by name, serves.
        with make_cluster(prefill=1, decode=1, prefill_args=["--state_transport=grpc"]) as c:
            code, lines, err = client(c, "complete", f"--token-ids={ids}", "--max-new-tokens=4", "--ignore-eos", "--json")
            self.assertEqual(code, 0, err)
            self.assertEqual(len(lines[0]["token_ids"]), 4)
        bad = subprocess.run([os.path.join(SERVICES, "sala-prefill"), f"--model={MODEL}", "--redis=",
                              "--state_transport=carrier-pigeon"], capture_output=True, text=True, timeout=60)
        self.assertEqual(bad.returncode, 2)
        self.assertIn("--state_transport must be", bad.stderr)

    def test_sigterm_drains_in_flight_work(self):
        c = make_cluster(prefill=1, decode=1).start()
        try:
            result = {}
            t = threading.Thread(target=lambda: result.update(r=http_json(
                c, "/v1/completions", {"prompt": random_ids(100, seed=81), "max_tokens": 200, "ignore_eos": True})))
            t.start()
            self.assertTrue(wait_for(lambda: metrics(c.decodes[0].metrics_url)["sala_num_requests_running"] == 1))
            c.decodes[0].proc.send_signal(signal.SIGTERM)
            t.join(60)
            self.assertEqual(result["r"][0], 200, result["r"][1])
            self.assertEqual(result["r"][1]["usage"]["completion_tokens"], 200)
            self.assertEqual(c.decodes[0].proc.wait(30), 0)
        finally:
            c.stop()


if __name__ == "__main__":
    unittest.main()
