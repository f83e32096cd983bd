"""Peak RSS of a command as an outside observer sees it: its own and its process tree's, sampled from
/proc every --interval seconds from start to exit (Linux).

    python tools/peak_rss.py [--interval 0.002] [--budget 600MB] -- edge-moe run MODEL --memory-budget 600MB ...

Prints the command's exit code, the peak RSS of the command's process, the peak of the sum over it
and its descendants (the first run's compile children included), when each peak happened, and the
kernel's own high-water mark of the process (getrusage, as /usr/bin/time -v reports it). With
--budget, says whether the process stayed under it.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import psutil

from edge_moe.config import format_size, parse_size


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of proc, RSS summed over proc and its descendants); 0 for what has exited."""
    try:
        own = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = own
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return own, total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.002, help="seconds between samples (default 0.002)")
    ap.add_argument("--budget", default=None, help="a size to compare the process's peak with")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    t0 = time.monotonic()
    child = subprocess.Popen(command)
    proc = psutil.Process(child.pid)
    peak, peak_t, tree, tree_t, samples = 0, 0.0, 0, 0.0, 0
    while child.poll() is None:
        own, total = tree_rss(proc)
        now = time.monotonic() - t0
        samples += 1
        if own > peak:
            peak, peak_t = own, now
        if total > tree:
            tree, tree_t = total, now
        time.sleep(args.interval)
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    seconds = time.monotonic() - t0
    print(f"exit code {child.returncode}; {samples} samples over {seconds:.1f} s", file=sys.stderr)
    print(f"peak RSS of the process: {format_size(peak)} at {peak_t:.2f} s (sampled); "
          f"{format_size(maxrss)} (getrusage, its largest process)", file=sys.stderr)
    print(f"peak RSS of the process tree: {format_size(tree)} at {tree_t:.2f} s (sampled)", file=sys.stderr)
    if args.budget:
        budget = parse_size(args.budget)
        verdict = "under" if max(peak, maxrss) <= budget else "OVER"
        print(f"budget {format_size(budget)}: the process stayed {verdict} it", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
