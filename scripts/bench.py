"""Entry point of the benchmark against Hugging Face transformers; the code is the package scripts/bench/
(its `__init__` says what is measured, one module per family).

    python scripts/bench.py                          # default sizes; minutes on 2 CPU cores
    python scripts/bench.py --quick                  # under 3 minutes on 2 idle CPU cores
    python scripts/bench.py --json results/bench.json --threads 2 --data ../shared/data
    python scripts/bench.py --quick --tiny --only decoder data    # a seconds-long check that the script runs
    python scripts/bench.py --only maps --json results/bench_maps.json    # attention maps' cost; about a minute
"""

import sys
from pathlib import Path

# run as a file, Python already puts scripts/ first; imported from elsewhere, it may not
if str(Path(__file__).resolve().parent) not in map(str, sys.path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.cli import main  # noqa: E402  (the package beside this file, once scripts/ is on the path)

if __name__ == "__main__":
    main()
