"""``python -m delta_trl.experiment CONFIG.yaml`` / ``accelerate launch -m delta_trl.experiment CONFIG.yaml``."""

import sys

from delta_trl.cli import main


if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
