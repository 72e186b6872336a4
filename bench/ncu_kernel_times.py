#!/usr/bin/env python3
"""Sums the kernel durations of an Nsight Compute CSV log by kernel name, largest first.

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \\
        bundle/bin/sala-bench --model=bundle/9b --lengths=131072 --decode_batches=1 > step.csv
    python3 bench/ncu_kernel_times.py step.csv

sala-bench marks one decode step for the profiler, so with --profile-from-start off the log holds
exactly one step's kernels; with --profiler_range=prefill --decode_batches= --profile=false it
holds the timed prefill's kernels instead. The log's own lines (the GPU and its floors, as sala-bench prints them)
are repeated at the top, so that a saved summary names its GPU.
"""
import collections
import csv
import sys

TO_MICROSECONDS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                   "s": 1e6, "second": 1e6}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    lines = open(sys.argv[1], errors="replace").read().splitlines()
    header = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line), None)
    if header is None:
        sys.exit(f"{sys.argv[1]}: no ncu CSV table in it")
    for line in lines[:header]:
        if not line.startswith("=="):  # ncu's own notes
            print(line)
    rows = list(csv.reader(lines[header:]))
    names = rows[0]
    kernel, value, unit = names.index("Kernel Name"), names.index("Metric Value"), names.index("Metric Unit")
    calls, micros = collections.Counter(), collections.Counter()
    for r in rows[1:]:
        if len(r) <= max(kernel, value, unit) or r[unit] not in TO_MICROSECONDS:
            continue
        name = r[kernel][:90]
        calls[name] += 1
        micros[name] += float(r[value].replace(",", "")) * TO_MICROSECONDS[r[unit]]
    print(f"{sum(calls.values())} kernels, {sum(micros.values()):.1f} us in all")
    for name, us in micros.most_common():
        print(f"{us:10.1f} us {calls[name]:5d}  {name}")


if __name__ == "__main__":
    main()
