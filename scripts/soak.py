"""Soak test: the quickstart run killed at random moments, restarted until done.

Runs the quickstart training (gin/runs/quickstart.gin: real all-MiniLM-L6-v2 on
the stdlib pairs) once uninterrupted, then again under a model dir where every
start is SIGKILLed after a random delay (often mid-step or mid-save) up to
`--kills` times, and finally lets it finish. Checks that the final parameters
equal the uninterrupted run's bit for bit and that no temporary checkpoint
folders are left behind. Prints one line per restart and a verdict.

    .venv/bin/python scripts/soak.py [--kills 20] [--steps 60] [--tiny]

`--tiny` swaps in the 2-layer model (gin/models/tiny.gin) for a fast check.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(model_dir: str, train_file: str, steps: int, tiny: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "embedder",
        "train",
        "--gin_file=runs/quickstart.gin",
        f"--gin.TRAIN_FILES=['{train_file}']",
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.SAVE_EVERY=2",
        f"--model_dir={model_dir}",
    ]
    if tiny:
        cmd += ["--gin_file=models/tiny.gin", "--gin.MRL_DIMS=[32, 16]"]
    return cmd


def _latest(model_dir: str) -> int:
    folder = os.path.join(model_dir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tiny", action="store_true", help="use the 2-layer model instead of MiniLM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.work_dir or tempfile.mkdtemp(prefix="embedder-soak-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    data_dir = os.path.join(work, "data")
    subprocess.run(
        [sys.executable, "-m", "embedder.data.stdlib_pairs", "--output_dir", data_dir],
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
    )
    train_file = os.path.join(data_dir, "train.jsonl")

    start = time.time()
    reference = os.path.join(work, "reference")
    subprocess.run(
        _command(reference, train_file, args.steps, args.tiny),
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
    )
    print(f"uninterrupted run: {time.time() - start:.0f}s", flush=True)

    soaked = os.path.join(work, "soaked")
    cmd = _command(soaked, train_file, args.steps, args.tiny)
    # Startup (imports, compile) takes a while; kill anywhere from just after it
    # to a few steps later.
    for kill in range(1, args.kills + 1):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(3.0, 30.0 if not args.tiny else 12.0)
        try:
            proc.wait(timeout=delay)
            print(f"restart {kill:2d}: finished before the kill", flush=True)
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        print(
            f"restart {kill:2d}: killed after {delay:4.1f}s, latest checkpoint step {_latest(soaked)}",
            flush=True,
        )
    finish = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if finish.returncode:
        print(finish.stderr[-3000:])
        return 1

    import jax
    import numpy as np

    from embedder import checkpointing

    want, _ = checkpointing.load_model_params(reference, args.steps)
    got, _ = checkpointing.load_model_params(soaked, args.steps)
    equal = all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    leftovers = [n for n in os.listdir(os.path.join(soaked, "checkpoints")) if not n.isdigit()]
    print(f"final parameters equal to the uninterrupted run: {equal}")
    print(f"temporary folders left: {leftovers or 'none'}")
    print(f"total {time.time() - start:.0f}s; work dir {work}")
    return 0 if equal and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
