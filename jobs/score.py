"""Ray job entrypoint of the scoring pipeline: the same run as ``ecif-ray score``.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/score.py --config jobs/configs/demo.yaml [any ecif-ray score flag to override it]

Inside a Ray job the job supervisor sets RAY_ADDRESS, so the run joins the cluster the job was
submitted to (no ``address`` needed in the config). The exit status is the command's (see
docs/pipeline.md), so a run with bad inputs shows up as a FAILED job with its summary in the logs.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import ecif_ray  # noqa: F401  (installed in the cluster's image)
except ImportError:  # not installed: use the copy shipped with --working-dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecif_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
