"""``python -m geoseg_cli``: the ``geoseg`` console script (for environments without the script on PATH)."""

from geoseg_cli import main

main()
