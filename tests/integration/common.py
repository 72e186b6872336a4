"""Paths and helpers shared by the integration tests (set by CTest)."""
import os
import random
import subprocess
import tempfile

MODEL = os.environ.get("SALA_TEST_MODEL", "")
BIN = os.environ.get("SALA_BIN_DIR", "")
SOURCE = os.environ.get("SALA_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
REFERENCE = os.path.join(SOURCE, "tools", "reference", "sala_ref.py")


def require_environment(test):
    if not MODEL or not BIN:
        test.fail("SALA_TEST_MODEL / SALA_BIN_DIR are not set: run through ctest")


def random_ids(n, seed, vocab=1024):
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def write_ids(ids):
    f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    f.write(" ".join(map(str, ids)))
    f.close()
    return f.name


def generate(*args, check=True):
    """Runs sala-generate; returns the CompletedProcess."""
    cmd = [os.path.join(BIN, "sala-generate"), f"--model={MODEL}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
