"""The mask and the polygons open styled in QGIS (runs only where PyQGIS is installed).

PyQGIS lives in the system Python (Debian: ``apt-get install python3-qgis qgis-providers``), not
in geoseg's virtual environment, so the check runs QGIS in a subprocess and reads back JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from geoseg.card import ClassInfo
from geoseg.engine import ModelSource, PredictOptions, segment_scene
from tests.conftest import SAMPLE_DATA
from tests.test_engine import identity_card

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")


def _has_qgis() -> bool:
    if not SYSTEM_PYTHON:
        return False
    proc = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, check=False)
    return proc.returncode == 0


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _has_qgis(), reason="PyQGIS not installed (python3-qgis)")]

QGIS_SCRIPT = r"""
import json, os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer
app = QgsApplication([], False); app.initQgis()
src, mask, gpkg = sys.argv[1:4]
s = QgsRasterLayer(src, "src"); r = QgsRasterLayer(mask, "mask")
v = QgsVectorLayer(gpkg + "|layername=landcover", "poly", "ogr")
out = {"valid": [s.isValid(), r.isValid(), v.isValid()]}
out["raster_style_ok"] = r.loadDefaultStyle()[1]
out["raster_renderer"] = r.renderer().type()
out["legend"] = [[int(c.value), c.label, c.color.name()] for c in r.renderer().classes()] if r.renderer().type() == "paletted" else []
out["vector_style_ok"] = v.loadDefaultStyle()[1]
vr = v.renderer()
out["vector_renderer"] = vr.type()
out["vector_attr"] = vr.classAttribute() if vr.type() == "categorizedSymbol" else None
out["categories"] = [[str(c.value()), c.label(), c.symbol().color().name()] for c in vr.categories()] if vr.type() == "categorizedSymbol" else []
out["features"] = v.featureCount()
out["proj"] = [s.crs().toProj(), r.crs().toProj(), v.crs().toProj()]
out["same_extent"] = r.extent() == s.extent()
c = QgsRasterLayer(sys.argv[4], "confidence")
ok = c.loadDefaultStyle()[1]
out["confidence"] = [ok, c.renderer().type(), c.renderer().classificationMax() if ok else None]
print(json.dumps(out), flush=True)
os._exit(0)  # QGIS 3.22 may crash in its teardown; the answer is already out
"""


@pytest.mark.parametrize("layer", ["mask", "batch mosaic"])
def test_mask_and_polygons_open_styled_in_qgis(tmp_path: Path, layer: str) -> None:
    classes = (ClassInfo(1, "developed", (230, 25, 25)), ClassInfo(5, "forest", (20, 110, 40)), ClassInfo(6, "water", (40, 90, 220)))
    card = identity_card(6, 3).replace(classes=classes)
    src = tmp_path / "scene.tif"  # a copy: QGIS writes statistics (.aux.xml) beside what it opens
    shutil.copy(SAMPLE_DATA / "nc_landsat7" / "image_6band_uint8.tif", src)

    def predict(x: np.ndarray) -> np.ndarray:  # class from the NIR band: dark → water, bright → forest
        cls = np.digitize(x[:, 3], [30, 60])
        return (np.arange(3)[None, :, None, None] == cls[:, None]).astype(np.float32)

    res = segment_scene(src, tmp_path / "out", source=ModelSource(card), predictor=predict,
                        options=PredictOptions(vector="gpkg", tile_size=256, overlap=64, confidence="uint8"))
    raster = res.mask
    if layer == "batch mosaic":  # batch's DIR/landcover.vrt (+ .qml) over the mask: the same layer, styled
        from geoseg.mosaic import write_mosaics

        raster = write_mosaics(res.mask.parent, [res.mask], classes)[0]
    # rasterio points GDAL_DATA/PROJ_DATA at its own wheel's data: QGIS must use the system's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "PROJ_", "CPL_"))}
    proc = subprocess.run([SYSTEM_PYTHON, "-c", QGIS_SCRIPT, str(src), str(raster), str(res.extra_outputs[0]),
                           str(res.confidence)],
                          capture_output=True, text=True, check=False, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["valid"] == [True, True, True]
    expected = [[1, "developed", "#e61919"], [5, "forest", "#146e28"], [6, "water", "#285adc"]]
    assert out["raster_style_ok"] and out["raster_renderer"] == "paletted"
    assert out["legend"] == expected
    assert out["vector_style_ok"] and out["vector_renderer"] == "categorizedSymbol" and out["vector_attr"] == "class_id"
    assert [[int(a), b, c] for a, b, c in out["categories"]] == expected
    assert out["features"] > 0
    assert out["proj"][0] == out["proj"][1] == out["proj"][2]
    assert out["same_extent"]
    assert out["confidence"] == [True, "singlebandpseudocolor", 100.0]  # percent on a fixed ramp
