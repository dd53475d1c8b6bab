from mosaic.cli import main

raise SystemExit(main(prog="python -m mosaic"))
