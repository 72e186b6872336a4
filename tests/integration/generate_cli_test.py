"""sala-generate as its users meet it: clear errors with exit code 2 for bad input, never a crash."""
import json
import os
import tempfile
import unittest

from common import generate, random_ids, require_environment, write_ids


class GenerateCliTest(unittest.TestCase):
    def setUp(self):
        require_environment(self)

    def expect_error(self, *args, message, code=2):
        proc = generate(*args, check=False)
        self.assertEqual(proc.returncode, code, proc.stderr)
        self.assertIn(message, proc.stderr)

    def test_streams_text_and_reports_timings(self):
        out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        proc = generate("--prompt=The router counts its tokens", "--max-new-tokens=8", "--seed=3",
                        "--ignore-eos", f"--json-out={out}")
        self.assertIn("TTFT", proc.stderr)
        result = json.load(open(out))
        self.assertEqual(len(result["tokens"]), 8)
        self.assertEqual(result["finish_reason"], "length")
        self.assertEqual(proc.stdout.rstrip("\n"), result["text"])

    def test_greedy_is_deterministic_and_chat_works(self):
        a = generate("--chat=Summarise the document.", "--system=Be brief.", "--greedy", "--max-new-tokens=6").stdout
        b = generate("--chat=Summarise the document.", "--system=Be brief.", "--greedy", "--max-new-tokens=6").stdout
        self.assertEqual(a, b)
        messages = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise the document."}],
                  messages)
        messages.close()
        self.assertEqual(generate(f"--messages-file={messages.name}", "--greedy", "--max-new-tokens=6").stdout, a)

    def test_bad_input(self):
        self.expect_error("--prompt=", message="give exactly one of")
        self.expect_error("--prompt=a", "--chat=b", message="give exactly one of")
        self.expect_error("--token-ids=", message="give exactly one of")
        self.expect_error("--token-ids=1,2,x", message="not a token id")
        self.expect_error("--token-ids=1,999999", message="outside the vocabulary")
        self.expect_error("--token-ids= , ", message="prompt is empty")
        self.expect_error(f"--token-ids-file={write_ids(random_ids(300, 1))}", "--max-context=200",
                          message="exceeds the maximum context of 200")
        self.expect_error("--prompt=hi", "--top-p=0", message="top_p")
        self.expect_error("--prompt=hi", "--temperature=-1", message="temperature")
        self.expect_error("--prompt=hi", "--chunk-size=-1", message="chunk size")
        self.expect_error("--prompt=hi", "--backend=tpu", message="unknown backend")
        empty = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        empty.write("{\"role\": 1}")
        empty.close()
        self.expect_error(f"--messages-file={empty.name}", message="JSON list")

    def test_missing_model(self):
        proc = generate("--prompt=hi", check=False)  # valid model: sanity
        self.assertEqual(proc.returncode, 0, proc.stderr)
        import subprocess
        from common import BIN
        proc = subprocess.run([os.path.join(BIN, "sala-generate"), "--model=/nonexistent", "--prompt=hi"],
                              capture_output=True, text=True)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("/nonexistent", proc.stderr)

    def test_help_lists_the_programs_own_flags(self):
        import subprocess
        from common import BIN
        for program, flag in [(os.path.join(BIN, "sala-generate"), "--max_new_tokens"),
                              (os.path.join(BIN, "..", "services", "sala-prefill"), "--state_step_mib")]:
            proc = subprocess.run([program, "--help"], capture_output=True, text=True)
            self.assertIn(flag, proc.stdout + proc.stderr, program)


if __name__ == "__main__":
    unittest.main()
