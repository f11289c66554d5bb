"""`python -m bench` from scripts/: the same as `python scripts/bench.py`."""

from .cli import main

main()
