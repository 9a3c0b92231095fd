"""What a Ray job runs: ``ray job submit -- python jobs/entrypoint.py JOB.yaml [--stages A,B] [--set k=v ...]``.

The same as ``scope-ray run JOB.yaml ...`` (the driver connects to the cluster the job runs on,
RAY_ADDRESS being set by Ray); the exit code is passed through, so the Ray job FAILS when a
stage fails. ``scope-ray sweep`` submits exactly this command, one job per model.
"""

import sys
from pathlib import Path

try:
    from scope_ray.cli import main
except ImportError:  # a checkout shipped as the job's working_dir without an install: use it as is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scope_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
