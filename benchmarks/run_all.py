"""`make bench`: every benchmark in turn, each printing its same-run ratio table.

Figures recorded so far, with the machine they ran on, are in benchmarks/RESULTS.md. Pass
--quick for the smaller sizes where a benchmark has them.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = {"bench_ridge.py": ["--quick"], "bench_features.py": ["--quick"]}


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n=== {script.name}", flush=True)
        args = QUICK.get(script.name, []) if quick else []
        if subprocess.run([sys.executable, str(script), *args], check=False).returncode != 0:
            failed.append(script.name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
