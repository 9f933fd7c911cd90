"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/tune.py --config FILE [key=value ...]`.

Thin on purpose: parses nothing itself, runs `puma-ray tune` with the same arguments.
Inside a Ray job the driver joins the job's cluster (base.ray.address defaults to the job's).
"""

import sys

from puma_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune"] + sys.argv[1:]))
