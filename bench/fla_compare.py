#!/usr/bin/env python3
"""Lightning (Simple-GLA) prefill: this engine's chunked kernel against flash-linear-attention's
`chunk_simple_gla` at the same shape, on the same GPU.

sala-bench times one prefill chunk of the lightning kernel (f16 q/k and bf16 v, f16 tensor-core
operands, the fp32 state carried in and out, bf16 output) and writes it as "lightning_chunk" in its
JSON; this script times `chunk_simple_gla` with the same tokens, heads, head dim, scale and
per-head decay (g_gamma = -slope), the initial state given and the final state returned, in bf16
(its fast path) and in fp32.

The GPU machines reach no package index: carry the wheels (pure Python, Triton kernels) and
point --wheels at them; PyTorch and Triton are those of the machine.

    pip download --no-deps fla-core einops -d wheels      # on a machine with PyPI
    bundle/bin/sala-bench --model=bundle/9b --lengths= --projection_rows= --out=bench.json
    python3 bench/fla_compare.py --sala-bench-json bench.json --wheels wheels --out fla.json
"""
import argparse
import glob
import json
import math
import os
import sys
import tempfile
import zipfile


def decay_slopes(n):
    """The per-head decay slopes of the lightning layers (LinearDecaySlopes in engine/src/model/config.cc)."""
    def power_of_two(m):
        start = 2.0 ** (-(2.0 ** (-(math.log2(m) - 3))))
        return [start ** (i + 1) for i in range(m)]
    if n & (n - 1) == 0:
        return power_of_two(n)
    p = 1
    while p * 2 < n:
        p *= 2
    s = power_of_two(p)
    extra = power_of_two(2 * p)
    i = 0
    while len(s) < n:
        s.append(extra[i])
        i += 2
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sala-bench-json", required=True, help="sala-bench --out file with lightning_chunk")
    ap.add_argument("--wheels", required=True, help="folder with the fla-core and einops wheels")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", help="write the comparison here as JSON")
    args = ap.parse_args()

    ours = json.load(open(args.sala_bench_json)).get("lightning_chunk")
    if not ours or not ours.get("seconds"):
        sys.exit(f"{args.sala_bench_json} has no lightning_chunk timing")
    # Wheels unpacked, not imported from the zip: Triton reads its kernels' source files.
    unpacked = tempfile.mkdtemp(prefix="fla-wheels-")
    wheels = glob.glob(os.path.join(args.wheels, "*.whl"))
    if not wheels:
        sys.exit(f"no wheels in {args.wheels}")
    for w in wheels:
        zipfile.ZipFile(w).extractall(unpacked)
    sys.path.insert(0, unpacked)

    import torch
    from fla.ops.simple_gla import chunk_simple_gla

    T, H, Hk, D = ours["tokens"], ours["heads"], ours["kv_heads"], ours["dim"]
    if Hk != H:
        sys.exit("chunk_simple_gla takes as many key heads as query heads")
    dev = torch.device("cuda")
    g_gamma = -torch.tensor(decay_slopes(H), dtype=torch.float32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(1)

    def time_fla(dtype):
        q, k, v = (torch.randn(1, T, H, D, device=dev, dtype=dtype, generator=gen) for _ in range(3))
        h0 = 0.1 * torch.randn(1, H, D, D, device=dev, dtype=torch.float32, generator=gen)
        run = lambda: chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=ours["scale"], initial_state=h0,
                                       output_final_state=True)
        for _ in range(3):  # warm-up, Triton's compilation and autotuning
            run()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]

    result = {"gpu": torch.cuda.get_device_name(), "tokens": T, "heads": H, "dim": D,
              "sala_seconds": ours["seconds"]}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        sec = time_fla(dtype)
        result[f"fla_{name}_seconds"] = sec
        result[f"speedup_vs_fla_{name}"] = sec / ours["seconds"]
    print(f"{result['gpu']}: lightning prefill chunk of {T} tokens, {H} heads, dim {D}")
    print(f"  sala (f16 tensor cores)            {1e3 * ours['seconds']:8.3f} ms")
    for name in ("bf16", "fp32"):
        print(f"  fla chunk_simple_gla ({name:4s})      {1e3 * result[f'fla_{name}_seconds']:8.3f} ms"
              f"  -> sala is {result[f'speedup_vs_fla_{name}']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
