"""Mosaic command line: prune a LLaMA-family model and measure what the pruning bought.

    python main.py --help
"""

from mosaic.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="main.py"))
