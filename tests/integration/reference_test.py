"""The C++ CPU engine against the independent float64 NumPy reference (MODEL_SPEC §2–4).

Last-position logits at prompt lengths below, at and far above dense_len (1024 in the built-in
model), with chunk sizes that do and do not divide blocks (64) and chunks, must agree to a
max relative error (max |cpp − ref| / max |ref|) below 1e-4.
"""
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

from common import MODEL, REFERENCE, generate, random_ids, require_environment, write_ids

TOLERANCE = 1e-4


def reference_logits(ids_file, *extra):
    out = tempfile.NamedTemporaryFile(suffix=".npy", delete=False).name
    subprocess.run([sys.executable, REFERENCE, "--model", MODEL, "--token-ids-file", ids_file, "--out", out, *extra],
                   check=True, timeout=600)
    return np.load(out)


def engine_logits(ids_file, *extra):
    out = tempfile.NamedTemporaryFile(suffix=".npy", delete=False).name
    generate(f"--token-ids-file={ids_file}", "--max-new-tokens=0", f"--logits-out={out}", "--quiet", *extra)
    return np.load(out).astype(np.float64)


def rel_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


class ReferenceTest(unittest.TestCase):
    def setUp(self):
        require_environment(self)

    def check(self, n, chunks, seed, *flags):
        ids_file = write_ids(random_ids(n, seed))
        ref = reference_logits(ids_file, *flags)
        for chunk in chunks:
            err = rel_error(engine_logits(ids_file, f"--chunk-size={chunk}", *flags), ref)
            print(f"{n} tokens, chunk {chunk} {' '.join(flags)}: max relative error {err:.2e}")
            self.assertLess(err, TOLERANCE, f"{n} tokens, chunk {chunk}")
        os.unlink(ids_file)
        return ref

    def test_below_dense_len(self):
        self.check(700, [8192, 100, 64], seed=1)

    def test_at_dense_len(self):
        self.check(1024, [8192, 512, 333], seed=2)

    def test_far_above_dense_len(self):
        ref = self.check(3000, [8192, 1000, 333, 64], seed=3)
        # The sparse path must matter here, or this test could not catch a silently dense engine.
        dense = reference_logits(write_ids(random_ids(3000, 3)), "--dense-len=1000000")
        self.assertGreater(rel_error(dense, ref), 1e-3)

    def test_dense_as_sparse(self):
        self.check(1500, [8192, 200], 4, "--dense-as-sparse")


if __name__ == "__main__":
    unittest.main()
