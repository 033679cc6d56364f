"""What other busy processes do to an engine step on a 2-core machine, in process: fresh
prefill steps (1 x 128 and 16 x 128 tokens, default model, dtype auto) timed with 0, 1 and
2 Python busy loops running beside them, at 2 and at 1 torch threads.

On 2 cores with 2 torch threads, one busy process makes a step several times slower than
its fair share would (an OpenMP barrier waits for the preempted thread while the other
spins); that is what a burst's first step meets while the gateway and the frontend take in
the rest of the burst.

    python benchmarks/contention_threads.py --out benchmarks/results/contention_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HOG = "while True:\n    sum(range(10000))\n"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _in_process import prefill_stepper, warm_engine  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--out", default="")
    a = p.parse_args()

    import torch

    llm = warm_engine(4096)
    one_step = prefill_stepper(llm)
    runner = llm.engine.core.executor

    threads0 = torch.get_num_threads()
    rows = []
    for hogs in (0, 1, 2):
        procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
        try:
            time.sleep(0.3)
            for threads in (threads0, 1):
                torch.set_num_threads(threads)
                for n, length in ((1, 128), (16, 128)):
                    times = [one_step(n, length) for _ in range(a.steps)]
                    row = {"busy_processes": hogs, "torch_threads": threads, "prompts": n, "prompt_len": length,
                           "step_ms_median": statistics.median(times), "step_ms": times}
                    rows.append(row)
                    print(f"busy {hogs}, threads {threads}, {n} x {length}: {row['step_ms_median']:.1f} ms "
                          f"(all {[round(t) for t in times]})", flush=True)
        finally:
            torch.set_num_threads(threads0)
            for proc in procs:
                proc.kill()
                proc.wait()
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"config": vars(a), "dtype": str(runner.dtype), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
