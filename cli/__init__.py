"""geoseg's command-line interface (installed as ``geoseg_cli``; console script ``geoseg``)."""
