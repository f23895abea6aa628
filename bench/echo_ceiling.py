"""The front's ceiling: requests/s through a server whose pipeline does nothing (tests'
custom_pipelines:make, an echo), so that what is measured is HTTP, decoding and validating the
body, admission, the pipe and the answer. Compares source trees in alternation, in one run:

    git worktree add /tmp/before <commit>
    python bench/echo_ceiling.py --tree before=/tmp/before --tree after=. --rounds 3

Each round starts each tree's server (1 worker, so the model process takes one core and the
front the other), runs bench/loadgen.py closed-loop at C=64 for 15 s (`POST /` with
`{"inputs": text}`), and stops it. Prints the median req/s per tree and the ratio against the
first tree.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(tree: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}:{tree / 'tests'}"}
    process = subprocess.Popen([sys.executable, "-m", "pipeserve", "--pipeline", "custom_pipelines:make",
                                "--workers", "1", "--port", str(port),
                                "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as reply:
                if reply.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server from {tree} did not become ready")


def load(port: int) -> float:
    out = subprocess.run([sys.executable, str(HERE / "loadgen.py"), "--port", str(port), "--closed", "64",
                          "--duration", "15"], capture_output=True, text=True, check=True, cwd=HERE)
    return float(json.loads(out.stdout)["requests_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = [(name, Path(path).resolve()) for name, path in (tree.split("=", 1) for tree in args.tree)]
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    for round_ in range(args.rounds):
        for name, tree in trees:
            port = free_port()
            server = serve(tree, port)
            try:
                results[name].append(load(port))
                print(f"round {round_ + 1} {name}: {results[name][-1]:.1f} req/s", flush=True)
            finally:
                server.terminate()
                server.wait(30)
    first = trees[0][0]
    print(f"\n| tree | POST / req/s, median of {args.rounds} | each round | ratio to {first} |")
    print("|---|---|---|---|")
    for name, _ in trees:
        median = statistics.median(results[name])
        rounds = ", ".join(f"{value:.1f}" for value in results[name])
        print(f"| {name} | {median:.1f} | {rounds} | {median / statistics.median(results[first]):.3f} |")


if __name__ == "__main__":
    main()
