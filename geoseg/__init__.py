"""geoseg: tiled remote-sensing segmentation of GeoTIFFs into QGIS-ready land-cover maps.

The library never imports PaddlePaddle at import time; only :mod:`geoseg.models`,
:mod:`geoseg.engine` and :mod:`geoseg.train` do, when a model runs.
"""

__version__ = "0.1.0"
