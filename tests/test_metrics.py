"""geoseg evaluate: confusion matrix and metrics against hand computations, grid checks, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

from geoseg.errors import EvaluationWarning, GeosegWarning, GridMismatchError, NoCRSWarning, ParameterError
from geoseg.evaluate import evaluate_rasters, evaluate_vector
from geoseg.metrics import ConfusionMatrix, compute_metrics
from tests.conftest import NC_LCC, write_raster

# Reference (0 = unlabelled) and prediction (255 = nodata), classes 1 and 2.
REF = np.array([
    [1, 1, 1, 2],
    [1, 2, 2, 2],
    [0, 0, 1, 2],
], np.uint8)
PRED = np.array([
    [1, 1, 2, 2],
    [1, 1, 2, 255],
    [1, 2, 1, 2],
], np.uint8)
# Counted pixels (ref != 0, pred != 255): (ref, pred) pairs
#   row 0: (1,1) (1,1) (1,2) (2,2); row 1: (1,1) (2,1) (2,2) [(2,255) ignored]; row 2: (1,1) (2,2)
# cm rows = reference: [[4, 1], [1, 3]]
CM = np.array([[4, 1], [1, 3]])


def test_confusion_matrix_and_metrics_by_hand() -> None:
    cm = ConfusionMatrix([1, 2], ignore_reference=[0], ignore_prediction=[255])
    cm.update(REF[:2], PRED[:2])  # two blocks add up
    cm.update(REF[2:], PRED[2:])
    np.testing.assert_array_equal(cm.matrix, CM)
    assert cm.unpredicted == 1
    m = cm.metrics()
    # IoU_1 = 4 / (4 + 1 + 1), IoU_2 = 3 / (3 + 1 + 1)
    np.testing.assert_allclose(m.iou, [4 / 6, 3 / 5])
    assert m.miou == pytest.approx((4 / 6 + 3 / 5) / 2)
    np.testing.assert_allclose(m.precision, [4 / 5, 3 / 4])
    np.testing.assert_allclose(m.recall, [4 / 5, 3 / 4])
    np.testing.assert_allclose(m.f1, [8 / 10, 6 / 8])
    assert m.overall_accuracy == pytest.approx(7 / 9)
    # kappa: p_o = 7/9, p_e = (5*5 + 4*4) / 81 = 41/81
    po, pe = 7 / 9, 41 / 81
    assert m.kappa == pytest.approx((po - pe) / (1 - pe))


def test_undefined_classes_and_average_subset() -> None:
    cm = np.array([[5, 0, 0], [0, 0, 0], [2, 0, 3]])
    m = compute_metrics(cm, [1, 2, 3])
    assert np.isnan(m.iou[1]) and m.averaged_classes == (1, 3)
    assert m.miou == pytest.approx((5 / 7 + 3 / 5) / 2)
    m2 = compute_metrics(cm, [1, 2, 3], average_over=[3])
    assert m2.miou == pytest.approx(3 / 5)
    assert m.to_dict()["per_class"]["2"]["iou"] is None
    # a class asked for that has no reference and no prediction is not said to be averaged
    # (the mean was over the others while miou_classes, and a --record-card, named it)
    m3 = compute_metrics(cm, [1, 2, 3], average_over=[1, 2, 3])
    assert m3.averaged_classes == (1, 3) and m3.miou == pytest.approx(m.miou)


def test_a_class_id_given_twice_counts_once(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    """--miou-classes 1,1,2 weighed class 1 twice in the mean; --classes 1,1,2 ended in 'unexpected error:
    ValueError: duplicate class ids'."""
    m = compute_metrics(np.array([[5, 5], [0, 10]]), [1, 2], average_over=[1, 1, 2])
    assert m.averaged_classes == (1, 2) and m.miou == pytest.approx((5 / 10 + 10 / 15) / 2)
    with pytest.raises(ParameterError, match="name a class twice"):
        ConfusionMatrix([1, 2, 1])
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC, nodata=255)
    once = evaluate_rasters(pred, ref, classes=[1, 2], average_over=[1, 2]).metrics
    twice = evaluate_rasters(pred, ref, classes=[1, 2, 1], average_over=[2, 1, 2]).metrics
    assert twice.class_ids == once.class_ids and twice.miou == pytest.approx(once.miou)
    np.testing.assert_array_equal(twice.confusion, once.confusion)
    from geoseg_cli.main import cli

    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--classes", "1,1,2",
                             "--miou-classes", "1,2,2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["miou"] == pytest.approx(once.miou)


def test_miou_classes_without_any_pixel_are_warned_about_and_left_out(tmp_path: Path) -> None:
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC, nodata=255)
    with pytest.warns(EvaluationWarning, match=r"class 3 of --miou-classes has no reference and no predicted pixel "
                                               r"here: left out of the mIoU \(over 1,2\)"):
        m = evaluate_rasters(pred, ref, classes=[1, 2, 3], average_over=[1, 2, 3]).metrics
    assert m.averaged_classes == (1, 2) and m.to_dict()["miou_classes"] == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        warnings.filterwarnings("ignore", ".*have no prediction", EvaluationWarning)  # (PRED's one 255)
        assert evaluate_rasters(pred, ref, average_over=[1, 2]).metrics.averaged_classes == (1, 2)


def test_a_reference_nodata_that_is_no_whole_number_hides_no_class(tmp_path: Path) -> None:
    """uint8 reference with nodata 2.5 (no pixel can hold it): int() made it 2, and every class-2
    pixel vanished from the scores without a word."""
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=2.5)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC, nodata=255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # (reference 0 is a class here: not predicted)
        m = evaluate_rasters(pred, ref).metrics
    assert 2 in m.class_ids and m.support[m.class_ids.index(2)] == int((REF == 2).sum() - 1)  # one has no prediction


def test_evaluate_rasters_and_region(tmp_path: Path) -> None:
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC, nodata=255)
    r = evaluate_rasters(pred, ref, block_rows=1)
    np.testing.assert_array_equal(r.metrics.confusion, CM)
    assert r.metrics.class_ids == (1, 2)
    # Region: the last two columns only -> (1,2) (2,2) | (2,2) (2,255 ignored) | (1,1) (2,2)
    r2 = evaluate_rasters(pred, ref, region="2,0,2,3")
    np.testing.assert_array_equal(r2.metrics.confusion, [[1, 1], [0, 3]])
    assert r2.metrics.iou[1] == pytest.approx(3 / 4)


def test_class_zero_counts_when_it_is_one_of_the_classes(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    """A cloud mask's 0 is a class (cloud): the default ignores 0 only when it is not one."""
    import rasterio

    from geoseg.card import ClassInfo
    from geoseg.io import classes_tag

    ref0, pred0 = REF.copy(), PRED.copy()  # REF's 0 pixels become class 0 "cloud", predicted once right
    pred0[2, 0] = 0
    ref = write_raster(tmp_path / "ref.tif", ref0, crs=NC_LCC)
    pred = write_raster(tmp_path / "pred.tif", pred0, crs=NC_LCC, nodata=255)
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(**classes_tag([ClassInfo(0, "cloud", (255, 255, 255)), ClassInfo(1, "a", (1, 2, 3)),
                                      ClassInfo(2, "b", (4, 5, 6))]))
    r = evaluate_rasters(pred, ref)
    # (0,0) at row 2 col 0, (0,2) at row 2 col 1, plus CM's pixels
    np.testing.assert_array_equal(r.metrics.confusion, [[1, 0, 1], [0, 4, 1], [0, 1, 3]])
    assert r.metrics.class_ids == (0, 1, 2) and r.metrics.names[0] == "cloud"
    np.testing.assert_array_equal(evaluate_rasters(pred, ref, ignore=(0,)).metrics.confusion[1:, 1:], CM)
    # without a class table 0 stays "unlabelled" by default, as in the NC labels
    plain = write_raster(tmp_path / "plain.tif", pred0, crs=NC_LCC, nodata=255)
    np.testing.assert_array_equal(evaluate_rasters(plain, ref).metrics.confusion, CM)
    assert evaluate_rasters(plain, ref, classes=[0, 1, 2]).metrics.confusion.sum() == CM.sum() + 2
    from geoseg_cli.main import cli

    out = runner.invoke(cli, ["evaluate", str(plain), "--reference", str(ref), "--ignore", "none", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["confusion_matrix"] == [[1, 0, 1], [0, 4, 1], [0, 1, 3]]


def test_class_zero_of_another_tool_s_classes_tag_counts(tmp_path: Path) -> None:
    """Another tool's cloud mask names its classes in band 1's CLASSES tag (``0=cloud,...``), as vectorize
    reads it: evaluate left the 5,683 cloud pixels of such a reference out, with no word. Without any
    tag, a predicted 0 counted as an error says how to count 0 as a class."""
    import rasterio

    ref0, pred0 = REF.copy(), PRED.copy()
    pred0[2, 0] = 0
    ref = write_raster(tmp_path / "ref.tif", ref0, crs=NC_LCC)
    with rasterio.open(ref, "r+") as ds:
        ds.update_tags(1, CLASSES="0=cloud,1=a,2=b")
    pred = write_raster(tmp_path / "pred.tif", pred0, crs=NC_LCC, nodata=255)
    np.testing.assert_array_equal(evaluate_rasters(pred, ref).metrics.confusion, [[1, 0, 1], [0, 4, 1], [0, 1, 3]])
    np.testing.assert_array_equal(evaluate_rasters(pred, ref, ignore=(0,)).metrics.confusion, CM)
    with rasterio.open(ref, "r+") as ds:  # a tag naming 0 as no data: still not counted
        ds.update_tags(1, CLASSES="0=No Data,1=a,2=b")
    np.testing.assert_array_equal(evaluate_rasters(pred, ref).metrics.confusion, CM)
    # no tag either side: 0 is unlabelled by default; a 0 predicted on a labelled pixel says what to do
    plain_ref = write_raster(tmp_path / "plain_ref.tif", ref0, crs=NC_LCC)
    pred0[0, 0] = 0
    pred2 = write_raster(tmp_path / "pred2.tif", pred0, crs=NC_LCC, nodata=255)
    with pytest.warns(EvaluationWarning, match=r"prediction values \[0\] .*give --ignore none"):
        evaluate_rasters(pred2, plain_ref)
    with warnings.catch_warnings(record=True) as caught:  # (0 given as ignored: nothing to add)
        warnings.simplefilter("always")
        evaluate_rasters(pred2, plain_ref, ignore=(0,))
    assert not any("--ignore none" in str(w.message) for w in caught)


def test_mismatched_grids_are_refused_with_the_reason(tmp_path: Path) -> None:
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    shifted = write_raster(tmp_path / "s.tif", PRED, crs=NC_LCC, transform=from_origin(500010.0, 4800000.0, 10, 10))
    with pytest.raises(GridMismatchError, match="geotransforms"):
        evaluate_rasters(shifted, ref)
    wide = write_raster(tmp_path / "wide.tif", np.hstack([PRED[:2], PRED[:2, :1]]), crs=NC_LCC)  # neither holds the other
    with pytest.raises(GridMismatchError, match="5x2 pixels but ref.tif is 4x3"):
        evaluate_rasters(wide, ref)
    small = write_raster(tmp_path / "small.tif", PRED[:2], crs=NC_LCC)  # whole pixels of the reference's grid: taken
    assert evaluate_rasters(small, ref).metrics.total == int(((REF[:2] != 0) & (PRED[:2] != 255)).sum())
    other_crs = write_raster(tmp_path / "crs.tif", PRED)
    with pytest.raises(GridMismatchError, match="CRS"):
        evaluate_rasters(other_crs, ref)


def test_an_image_or_a_fractional_raster_is_not_taken_as_a_class_map(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg.errors import SceneError
    from geoseg_cli.main import cli

    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC)
    image = write_raster(tmp_path / "image.tif", np.stack([REF, PRED, REF]).astype(np.uint8), crs=NC_LCC)
    probs = write_raster(tmp_path / "probs.tif", np.stack([PRED, PRED]).astype(np.float32) / 3, crs=NC_LCC)
    floats = write_raster(tmp_path / "f.tif", REF.astype(np.float32) / 4, crs=NC_LCC)  # 0.25 ...: not class ids
    # band 1 of an image used to be read as classes: a 256-class matrix, exit 0
    with pytest.raises(SceneError, match="reference image.tif has 3 bands, a class raster has one: give the label"):
        evaluate_rasters(pred, image)
    with pytest.raises(SceneError, match="prediction probs.tif has 2 bands.*not an image or a probabilities raster"):
        evaluate_rasters(probs, ref)
    with pytest.raises(SceneError, match=r"reference f.tif holds float32 values that are not whole class ids "
                                         r"\(e.g. 0.25\): give the class map \(for probabilities, their argmax\)"):
        evaluate_rasters(pred, floats)
    with pytest.raises(SceneError, match="prediction f.tif holds float32 values, a class raster holds integers: .*"
                                         r"whole class ids, convert it first \(gdal_translate -ot Int32 f.tif f_ids.tif"):
        evaluate_rasters(floats, ref)
    with pytest.raises(SceneError, match="prediction image.tif has 3 bands"):
        evaluate_vector(image, _geojson(tmp_path / "r.geojson", [(_pixel_square(0, 0), {"cls": 1})]), field="cls")
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(image)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "3 bands" in r.output, r.output


def test_cli_evaluate_table_json_and_errors(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC, nodata=255)
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref)])
    assert r.exit_code == 0, r.output
    assert "mIoU" in r.output and "Cohen's kappa" in r.output and "confusion matrix" in r.output
    r = runner.invoke(cli, ["-q", "evaluate", str(pred), "--reference", str(ref), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["confusion_matrix"] == CM.tolist()
    assert d["overall_accuracy"] == pytest.approx(7 / 9, abs=1e-6)
    assert d["per_class"]["1"]["iou"] == pytest.approx(4 / 6, abs=1e-6)
    small = write_raster(tmp_path / "small.tif", PRED[:2], crs=NC_LCC, transform=from_origin(500005.0, 4800000.0, 10, 10))
    r = runner.invoke(cli, ["evaluate", str(small), "--reference", str(ref)])
    assert r.exit_code == 1 and "grids do not match" in r.output
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--region", "1,2"])
    assert r.exit_code == 1 and "col_off,row_off,width,height" in r.output
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--miou-classes", "1,9"])
    assert r.exit_code == 1 and "classes [9] to average over" in r.output and "unexpected" not in r.output


def test_record_in_card(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    from geoseg.card import ModelCard, default_card

    import rasterio

    from geoseg.card import ClassInfo

    mc = default_card("unet", 3, 2)
    card = mc.replace(classes=(ClassInfo(1, "a", (1, 1, 1)), ClassInfo(2, "b", (2, 2, 2)))).save(tmp_path / "m.yaml")
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC, nodata=255)
    args = ["-q", "evaluate", str(pred), "--reference", str(ref), "--region", "0,0,4,3", "--miou-classes", "1,2"]
    r = runner.invoke(cli, [*args, "--record-card", str(card)])
    assert r.exit_code == 0, r.output
    test = ModelCard.load(card).metrics["test"]
    assert test["miou_classes"] == [1, 2] and test["overall_accuracy"] == pytest.approx(7 / 9, abs=1e-4)
    assert test["per_class_iou"]["1"] == pytest.approx(4 / 6, abs=1e-4) and test["region"] == [0, 0, 4, 3]
    # figures of another model's mask, or of classes the card does not have, are not recorded in it
    other = mc.save(tmp_path / "other.yaml")  # classes 0, 1
    r = runner.invoke(cli, [*args, "--record-card", str(other)])
    assert r.exit_code == 1 and "other.yaml has no class 2: these figures are not of its model" in r.output, r.output
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(GEOSEG_MODEL="buildings-v2")
    r = runner.invoke(cli, [*args, "--record-card", str(card)])
    assert r.exit_code == 1 and "pred.tif was made by model 'buildings-v2', not by 'unet-untrained'" in r.output, r.output
    assert "test" not in ModelCard.load(other).metrics
    # train's own entry is not replaced, an empty key not written, and a replaced entry is said
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(GEOSEG_MODEL="unet-untrained")
    for key, words in (("validation", "that entry holds what geoseg train measured"), ("", "give a name for the entry")):
        r = runner.invoke(cli, [*args, "--record-card", str(card), "--record-as", key])
        assert r.exit_code == 1 and words in r.output and "confusion" not in r.output, r.output
    assert set(ModelCard.load(card).metrics) == {"test"}
    r = runner.invoke(cli, ["evaluate", *args[2:], "--record-card", str(card)])
    assert r.exit_code == 0 and "m.yaml: metrics.test (mIoU " in r.output and "is replaced" in r.output, r.output


# ---- vector references ---------------------------------------------------------------------------
def _lonlat(cols: np.ndarray, rows: np.ndarray) -> tuple[list[float], list[float]]:
    """Pixel (col, row) positions of write_raster's default UTM 33N grid (10 m) in lon/lat."""
    from rasterio.warp import transform

    return transform("EPSG:32633", "EPSG:4326", list(500000 + 10 * np.asarray(cols, float)),
                     list(4800000 - 10 * np.asarray(rows, float)))


def _geojson(path: Path, features: list[tuple[dict, dict]]) -> Path:
    """A GeoJSON FeatureCollection (lon/lat) of (geometry, properties) pairs."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": g, "properties": p} for g, p in features]}))
    return path


def _pixel_square(c: int, r: int, c1: int | None = None, r1: int | None = None) -> dict:
    c1, r1 = (c + 1 if c1 is None else c1), (r + 1 if r1 is None else r1)
    xs, ys = _lonlat(np.array([c, c1, c1, c, c]), np.array([r, r, r1, r1, r]))
    return {"type": "Polygon", "coordinates": [list(map(list, zip(xs, ys)))]}


def test_evaluate_against_field_points_in_another_crs(tmp_path: Path) -> None:
    from geoseg.evaluate import evaluate_vector

    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)  # UTM 33N; the points are in lon/lat
    rows, cols = np.indices(REF.shape)
    xs, ys = _lonlat(cols.ravel() + 0.5, rows.ravel() + 0.5)  # one point per pixel centre, REF's class (0: unlabelled)
    feats = [({"type": "Point", "coordinates": [x, y]}, {"cls": int(v)}) for x, y, v in zip(xs, ys, REF.ravel())]
    far = _lonlat([40.5], [0.5])
    feats += [({"type": "Point", "coordinates": [far[0][0], far[1][0]]}, {"cls": 1}),  # outside the raster
              ({"type": "Point", "coordinates": [xs[0], ys[0]]}, {"cls": None}),  # no class
              (None, {"cls": 2})]  # no geometry (it vanished without a word)
    ref = _geojson(tmp_path / "points.geojson", feats)
    with pytest.warns(EvaluationWarning, match="1 reference features with a class have no geometry"):
        r = evaluate_vector(pred, ref, field="cls")
    np.testing.assert_array_equal(r.metrics.confusion, CM)  # as the same labels as a raster
    assert r.metrics.unpredicted == 1 and r.metrics.overall_accuracy == pytest.approx(7 / 9)
    assert r.samples == {"points": 12, "points_outside": 1, "points_ignored": 2, "polygons": 0, "polygon_pixels": 0,
                         "features_without_class": 1, "features_without_geometry": 1}  # REF's two 0 points ignored
    r2 = evaluate_vector(pred, ref, field="cls", region="2,0,2,3", block_rows=1)
    np.testing.assert_array_equal(r2.metrics.confusion, [[1, 1], [0, 3]])  # as the raster region
    assert r2.samples["points"] == 6 and r2.samples["points_outside"] == 7
    # a multi-point is one sample per point
    mp = {"type": "MultiPoint", "coordinates": [[xs[0], ys[0]], [xs[2], ys[2]]]}  # (1,1) and (1,2)
    r3 = evaluate_vector(pred, _geojson(tmp_path / "mp.geojson", [(mp, {"cls": 1})]), field="cls")
    np.testing.assert_array_equal(r3.metrics.confusion, [[1, 1], [0, 0]])


def test_evaluate_against_polygons_by_class_name(tmp_path: Path) -> None:
    import rasterio

    from geoseg.card import ClassInfo
    from geoseg.evaluate import evaluate_vector
    from geoseg.io import classes_tag

    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(**classes_tag([ClassInfo(1, "forest", (1, 2, 3)), ClassInfo(2, "water", (4, 5, 6))]))
    names = {1: "Forest", 2: "WATER"}
    squares = [(_pixel_square(c, r), {"lc": names[int(REF[r, c])]}) for r, c in zip(*np.nonzero(REF))]
    ref = _geojson(tmp_path / "squares.geojson", squares)
    for block_rows in (1, 256):
        r = evaluate_vector(pred, ref, field="lc", block_rows=block_rows)
        np.testing.assert_array_equal(r.metrics.confusion, CM)
        assert r.samples["polygons"] == 10 and r.samples["polygon_pixels"] == 10
        assert r.metrics.names == {1: "forest", 2: "water"}
    # a field typed partly as ids, partly as names (a sample's reference column filled by two people):
    # it was refused ("values 1, 2 are not class names"); whole numbers are ids there too
    mixed = [(sq, {"lc": str(int(REF[r, c])) if i % 2 else props["lc"]})
             for i, ((sq, props), r, c) in enumerate(zip(squares, *np.nonzero(REF)))]
    r = evaluate_vector(pred, _geojson(tmp_path / "mixed.geojson", mixed), field="lc")
    np.testing.assert_array_equal(r.metrics.confusion, CM)
    with pytest.raises(ParameterError, match=r"lc must hold whole class ids or class names within 32-bit integers"):
        evaluate_vector(pred, _geojson(tmp_path / "huge.geojson", [*mixed, (_pixel_square(0, 0), {"lc": "9999999999"})]),
                        field="lc")
    # where polygons overlap the later one wins: a whole-raster forest polygon first, the squares over it
    whole = (_pixel_square(0, 0, 4, 3), {"lc": "forest"})
    r = evaluate_vector(pred, _geojson(tmp_path / "over.geojson", [whole, *squares]), field="lc")
    np.testing.assert_array_equal(r.metrics.confusion, CM + [[1, 1], [0, 0]])  # REF's two 0 pixels are forest now
    # the class field: named in the error with the file's fields; names must be the prediction's classes
    with pytest.raises(ParameterError, match=r"has no field 'class_id': give --field.*its fields: lc\), or, when "
                                             r"every feature is of one class .* --background"):
        evaluate_vector(pred, ref)
    many = _geojson(tmp_path / "many.geojson", [(_pixel_square(0, 0), {f"f{i:02d}": i for i in range(20)})])
    with pytest.raises(ParameterError, match=r"its fields: f00, f01, .*, f11 and 8 more\)"):  # (an OSM export's 73)
        evaluate_vector(pred, many)
    bad = _geojson(tmp_path / "bad.geojson", [(_pixel_square(0, 0), {"lc": "swamp"})])
    with pytest.raises(ParameterError, match="swamp are not class names or ids: the prediction's classes are forest, water"):
        evaluate_vector(pred, bad, field="lc")
    line = {"type": "LineString", "coordinates": _pixel_square(0, 0)["coordinates"][0][:2]}
    with pytest.raises(ParameterError, match="has lines"):
        evaluate_vector(pred, _geojson(tmp_path / "line.geojson", [(line, {"lc": "forest"})]), field="lc")
    away = _geojson(tmp_path / "away.geojson", [(_pixel_square(100, 100), {"lc": "forest"})])
    with pytest.raises(ParameterError, match="no reference sample of away.geojson falls on a predicted pixel"):
        evaluate_vector(pred, away, field="lc")


def test_footprints_with_a_background_score_like_their_raster(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    """Building footprints without a class field, around them background 0: every pixel of the
    prediction is scored (false positives too), exactly as the footprints burned into a raster."""
    import rasterio

    from geoseg.card import ClassInfo
    from geoseg.evaluate import evaluate_vector
    from geoseg.io import classes_tag
    from geoseg_cli.main import cli

    rng = np.random.default_rng(4)
    pred_arr = rng.integers(0, 2, (12, 10)).astype(np.uint8)
    pred_arr[0, 0] = 255  # nodata: not counted
    pred = write_raster(tmp_path / "pred.tif", pred_arr, nodata=255)
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(**classes_tag([ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, "building", (9, 9, 9))]))
    boxes = [(1, 1, 4, 3), (5, 2, 9, 6), (2, 7, 4, 11)]  # col0, row0, col1, row1
    ref_arr = np.zeros_like(pred_arr)
    for c0, r0, c1, r1 in boxes:
        ref_arr[r0:r1, c0:c1] = 1
    feats = [(_pixel_square(c0, r0, c1, r1), {"osm_id": k}) for k, (c0, r0, c1, r1) in enumerate(boxes)]
    ref = _geojson(tmp_path / "footprints.geojson", feats)
    as_raster = evaluate_rasters(pred, write_raster(tmp_path / "ref.tif", ref_arr), ignore=())
    for block_rows in (1, 5, 256):
        r = evaluate_vector(pred, ref, background=0, block_rows=block_rows)  # no class field: the polygons are 1
        np.testing.assert_array_equal(r.metrics.confusion, as_raster.metrics.confusion)
        assert r.metrics.confusion.sum() == pred_arr.size - 1 and r.metrics.confusion[0].sum() > 0
    assert evaluate_vector(pred, ref, background="Background").metrics.confusion.tolist() == as_raster.metrics.confusion.tolist()
    # without --background only the footprints' pixels count (recall alone)
    with pytest.raises(ParameterError, match="has no field 'class_id'"):
        evaluate_vector(pred, ref)
    with pytest.raises(ParameterError, match=r"class 'roads' is not one of pred.tif's classes \(0 background, 1 building\)"):
        evaluate_vector(pred, ref, background="roads")
    with pytest.raises(ParameterError, match=r"--background 0 is also an --ignore value"):
        evaluate_vector(pred, ref, background=0, ignore=(0,))
    xs, ys = _lonlat([1.5], [1.5])
    pts = _geojson(tmp_path / "pts.geojson", [({"type": "Point", "coordinates": [xs[0], ys[0]]}, {"class_id": 1})])
    with pytest.raises(ParameterError, match="--background makes pts.geojson a complete map of polygons; it has points"):
        evaluate_vector(pred, pts, background=0)
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--background", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["confusion_matrix"] == as_raster.metrics.confusion.tolist()
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(tmp_path / "ref.tif"), "--background", "0"])
    assert r.exit_code == 1 and "--background is for a vector reference" in r.output
    # another tool's building map names its classes in band 1's CLASSES tag, not in geoseg's table (it "had 0
    # classes"); without either, the message says what is missing
    other = write_raster(tmp_path / "other.tif", pred_arr, nodata=255)
    with rasterio.open(other, "r+") as ds:
        ds.update_tags(1, CLASSES="0=background,1=building,255=nodata")
    for fill in (0, "background"):  # (by name: "not one of other.tif's classes (it has no class table)")
        r = evaluate_vector(other, ref, background=fill)
        assert r.metrics.confusion.tolist() == as_raster.metrics.confusion.tolist()
    with rasterio.open(other, "r+") as ds:  # the prediction's nodata is no class, whatever the tag calls it
        ds.update_tags(1, CLASSES="0=background,1=building,255=outside")
    assert evaluate_vector(other, ref, background=0).metrics.confusion.tolist() == as_raster.metrics.confusion.tolist()
    with pytest.raises(ParameterError, match=r"has 0 classes, and no class table or CLASSES tag\)"):
        evaluate_vector(write_raster(tmp_path / "bare.tif", pred_arr, nodata=255), ref, background=0, ignore=())


def test_cli_evaluate_vector_reference(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)
    rows, cols = np.nonzero(REF)
    xs, ys = _lonlat(cols + 0.5, rows + 0.5)
    ref = _geojson(tmp_path / "pts.geojson", [({"type": "Point", "coordinates": [x, y]}, {"class_id": int(v)})
                                              for x, y, v in zip(xs, ys, REF[rows, cols])])
    r = runner.invoke(cli, ["-q", "evaluate", str(pred), "--reference", str(ref), "--json"])  # class_id by default
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["confusion_matrix"] == CM.tolist() and d["reference_samples"]["points"] == 10
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref)])
    assert r.exit_code == 0 and "10 points, 0 polygons" in r.stdout, r.output
    raster_ref = write_raster(tmp_path / "ref.tif", REF, nodata=0)
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(raster_ref), "--field", "x"])
    assert r.exit_code == 1 and "--field is for a vector reference" in r.output and "Traceback" not in r.output


def test_nc_polygons_in_their_own_crs_fall_on_the_label_raster(runner) -> None:  # type: ignore[no-untyped-def]
    """Real data: the NC sample's 34 class polygons (EPSG:3358) against its label raster (an LCC grid)."""
    import pyogrio
    import rasterio
    import shapely
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    from geoseg.evaluate import evaluate_vector
    from geoseg_cli.main import cli

    root = Path(__file__).resolve().parents[1] / "sample_data" / "nc_landsat7"
    labels, polys = root / "landcover96_labels.tif", root / "landsat96_polygons.gpkg"
    r = evaluate_vector(labels, polys, field="id", block_rows=64)
    # the polygons were digitised on this map: after reprojection every pixel they cover has their class
    cm = r.metrics.confusion
    assert np.count_nonzero(cm - np.diag(np.diag(cm))) == 0 and r.metrics.class_ids == (1, 2, 3, 4, 5, 6, 7)
    # the same pixels as reprojecting each polygon with GDAL and burning them onto the whole grid at once
    meta, _, wkb, fields = pyogrio.raw.read(polys)
    with rasterio.open(labels) as ds:
        shapes = [transform_geom(meta["crs"], ds.crs, shapely.geometry.mapping(g)) for g in shapely.from_wkb(wkb)]
        burned = rasterize(zip(shapes, fields[list(meta["fields"]).index("id")].tolist()), out_shape=ds.shape,
                           transform=ds.transform, fill=0, dtype="int32")
        lab = ds.read(1)
    expected = np.bincount(burned[(burned > 0) & (lab > 0)], minlength=8)[1:]
    np.testing.assert_array_equal(np.diag(cm), expected)
    assert r.samples == {"points": 0, "points_outside": 0, "points_ignored": 0, "polygons": 34,
                         "polygon_pixels": int((burned > 0).sum()), "features_without_class": 0,
                         "features_without_geometry": 0}
    # through the CLI, only the train columns: fewer pixels, still all agreeing
    out = runner.invoke(cli, ["-q", "evaluate", str(labels), "--reference", str(polys), "--field", "id",
                              "--region", "0,0,326,443", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert 0 < d["pixels"] < cm.sum() and d["overall_accuracy"] == 1.0


def test_stratified_estimates_reproduce_olofsson_2014() -> None:
    """The worked example of Olofsson et al. (2014, Remote Sens. Environ. 148, Table 8 and p. 54)."""
    from geoseg.metrics import stratified_estimates

    counts = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])  # rows = map
    mapped = np.array([200_000, 150_000, 3_200_000, 6_450_000])  # pixels of 30 m
    e = stratified_estimates(counts, mapped, [1, 2, 3, 4], pixel_area=900.0)
    # the paper's figures (deforestation, forest gain, stable forest, stable non-forest), rounded as printed
    np.testing.assert_allclose(e.area / 1e4, [21_158, 11_686, 285_770, 581_386], atol=1)  # ha
    np.testing.assert_allclose(e.area_ci / 1e4, [6_158, 3_756, 15_510, 16_282], atol=1)
    np.testing.assert_allclose(e.users_accuracy, [0.88, 0.73, 0.93, 0.96], atol=0.006)
    np.testing.assert_allclose(e.users_accuracy_ci, [0.07, 0.10, 0.04, 0.02], atol=0.006)
    np.testing.assert_allclose(e.producers_accuracy, [0.75, 0.85, 0.93, 0.96], atol=0.006)
    assert e.overall_accuracy == pytest.approx(0.95, abs=0.005) and e.overall_accuracy_ci == pytest.approx(0.02, abs=0.005)
    assert e.area.sum() == pytest.approx(mapped.sum() * 900.0)  # the adjusted areas redistribute the mapped total
    assert e.proportions.sum() == pytest.approx(1.0)


def test_evaluate_stratified_on_a_degree_grid_weighs_strata_by_ground_area(tmp_path: Path) -> None:
    """EPSG:4326 pixels shrink towards the poles: two classes with the same pixel count but at other
    latitudes map other areas, and the estimates weigh them by those (geodesic m²), not by pixels."""
    import rasterio.transform

    from geoseg.evaluate import evaluate_vector

    pyproj = pytest.importorskip("pyproj")
    mask = np.full((60, 10), 2, np.uint8)
    mask[:30] = 1  # class 1 at 60-30 °N, class 2 at 30-0 °N: 300 one-degree pixels each
    pred = write_raster(tmp_path / "map.tif", mask, nodata=255, crs="EPSG:4326",
                        transform=rasterio.transform.from_origin(0.0, 60.0, 1.0, 1.0))
    geod = pyproj.Geod(ellps="WGS84")
    row = np.array([abs(geod.polygon_area_perimeter([0, 1, 1, 0], [60 - r, 60 - r, 59 - r, 59 - r])[0])
                    for r in range(60)])
    want = [10 * row[:30].sum(), 10 * row[30:].sum()]
    # 9 points per class, at pixel centres, labelled with the map's class (one of class 1 wrongly)
    feats = [({"type": "Point", "coordinates": [c + 0.5, 60 - r - 0.5]}, {"cls": int(mask[r, c])})
             for r in (3, 12, 21, 34, 45, 56) for c in (1, 4, 7)]
    feats[0][1]["cls"] = 2
    ref = _geojson(tmp_path / "sample.geojson", feats)
    e = evaluate_vector(pred, ref, field="cls", stratified=True).stratified
    assert e.area_units == "m2" and list(e.map_pixels) == [300, 300]
    np.testing.assert_allclose(e.mapped_area, want, rtol=1e-9)
    assert want[1] > 1.3 * want[0]  # the same pixel count
    assert e.area.sum() == pytest.approx(sum(want))
    # class 1's user's accuracy (one error in its 9 points) weighs by its smaller area in the overall accuracy
    ua1 = e.users_accuracy[0]
    assert e.overall_accuracy == pytest.approx((want[0] * ua1 + want[1]) / sum(want))


def test_evaluate_stratified_on_web_mercator_weighs_strata_by_ground_area(tmp_path: Path) -> None:
    """Web Mercator's map m² are 1/cos²(latitude) times the ground's: the strata's areas were map units (an
    AreaWarning said so); they are ellipsoidal m² now, pixel by pixel."""
    import rasterio.transform

    from geoseg.evaluate import evaluate_vector

    pyproj = pytest.importorskip("pyproj")
    mask = np.full((60, 10), 2, np.uint8)
    mask[:30] = 1
    x0, y0, px = 1.0e6, 8.0e6, 20_000.0  # 20 km pixels from 58° N to 48° N
    pred = write_raster(tmp_path / "map.tif", mask, nodata=255, crs="EPSG:3857",
                        transform=rasterio.transform.from_origin(x0, y0, px, px))
    to_geo = pyproj.Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    geod = pyproj.Geod(ellps="WGS84")
    row = []
    for r in range(60):  # a row's pixel: its corners, its edges along parallels and meridians in pieces
        xs = np.r_[np.linspace(x0, x0 + px, 50), np.full(50, x0 + px), np.linspace(x0 + px, x0, 50), np.full(50, x0)]
        ys = np.r_[np.full(50, y0 - px * r), np.linspace(y0 - px * r, y0 - px * (r + 1), 50),
                   np.full(50, y0 - px * (r + 1)), np.linspace(y0 - px * (r + 1), y0 - px * r, 50)]
        row.append(abs(geod.polygon_area_perimeter(*to_geo.transform(xs, ys))[0]))
    want = [10 * sum(row[:30]), 10 * sum(row[30:])]
    feats = [({"type": "Point", "coordinates": list(to_geo.transform(x0 + px * (c + 0.5), y0 - px * (r + 0.5)))},
              {"cls": int(mask[r, c])}) for r in (3, 12, 21, 34, 45, 56) for c in (1, 4, 7)]
    ref = _geojson(tmp_path / "sample.geojson", feats)
    e = evaluate_vector(pred, ref, field="cls", stratified=True).stratified
    assert e.area_units == "m2" and list(e.map_pixels) == [300, 300]
    np.testing.assert_allclose(e.mapped_area, want, rtol=1e-5)
    assert 300 * px * px > 2.4 * want[0]  # (in map units, class 1 was 2.4-3.5 times its area)


def test_evaluate_stratified_points_weights_by_mapped_area(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg.evaluate import evaluate_vector
    from geoseg.metrics import stratified_estimates
    from geoseg_cli.main import cli

    mask = np.full((40, 50), 1, np.uint8)
    mask[:, 40:] = 2  # class 2 maps 400 pixels, class 1 1,600 (10 m pixels: 100 m² each)
    mask[:2, :2] = 255
    pred = write_raster(tmp_path / "map.tif", mask, nodata=255)
    rng = np.random.default_rng(0)
    pts, truth = [], []
    for cls, cols in ((1, (2, 40)), (2, (40, 50))):  # 20 points per stratum, whatever its area
        for _ in range(20):
            r, c = int(rng.integers(2, 40)), int(rng.integers(*cols))
            pts.append((c, r))
            truth.append(cls if rng.random() < (0.9 if cls == 1 else 0.6) else 3 - cls)
    xs, ys = _lonlat(np.array([c + 0.5 for c, _ in pts]), np.array([r + 0.5 for _, r in pts]))
    ref = _geojson(tmp_path / "sample.geojson", [({"type": "Point", "coordinates": [x, y]}, {"cls": t})
                                                 for x, y, t in zip(xs, ys, truth)])
    r = evaluate_vector(pred, ref, field="cls", stratified=True)
    counts = np.zeros((2, 2), int)
    for (c, row), t in zip(pts, truth):
        counts[mask[row, c] - 1, t - 1] += 1
    want = stratified_estimates(counts, [(mask == 1).sum(), (mask == 2).sum()], [1, 2], pixel_area=100.0)
    e = r.stratified
    np.testing.assert_allclose(e.area, want.area)
    np.testing.assert_allclose(e.area_ci, want.area_ci)
    assert list(e.samples) == [20, 20] and list(e.map_pixels) == [1596, 400]
    assert e.overall_accuracy == pytest.approx(want.overall_accuracy)
    # the sample's plain OA weighs both strata alike; the estimate weighs them by mapped area
    assert r.metrics.overall_accuracy != pytest.approx(e.overall_accuracy)
    out = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--field", "cls", "--stratified"])
    assert out.exit_code == 0, out.output
    assert "area-weighted estimates" in out.stdout and f"{e.overall_accuracy:.3f} ±" in out.stdout
    assert "(areas in m2)" in out.stdout
    out = runner.invoke(cli, ["-q", "evaluate", str(pred), "--reference", str(ref), "--field", "cls", "--stratified",
                              "--json"])
    assert json.loads(out.stdout)["stratified"]["per_class"]["2"]["map_pixels"] == 400
    squares = _geojson(tmp_path / "sq.geojson", [(_pixel_square(5, 5), {"cls": 1})])
    with pytest.raises(ParameterError, match="--stratified needs sample points"):
        evaluate_vector(pred, squares, field="cls", stratified=True)


def test_sample_draws_each_class_uniformly_and_round_trips_through_evaluate(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    import pyogrio
    import rasterio
    import shapely

    from geoseg.card import ClassInfo
    from geoseg.evaluate import draw_sample, evaluate_vector
    from geoseg.io import classes_tag
    from geoseg_cli.main import cli

    mask = np.full((30, 40), 255, np.uint8)
    mask[:, :20] = 1  # 600 pixels
    mask[:, 20:30] = 2  # 300
    mask[:1, 30:40] = 3  # 10
    pred = write_raster(tmp_path / "map.tif", mask, nodata=255)
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(**classes_tag([ClassInfo(1, "forest", (1, 2, 3)), ClassInfo(2, "water", (4, 5, 6)),
                                      ClassInfo(3, "sand", (7, 8, 9))]))
    res = draw_sample(pred, tmp_path / "s.gpkg", per_class=50, seed=1, block_rows=7)
    assert res.points == {1: 50, 2: 50, 3: 10} and res.map_pixels == {1: 600, 2: 300, 3: 10}
    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "s.gpkg")
    names = list(meta["fields"])
    assert names == ["sample_id", "map_class", "map_name", "reference"]
    pts = shapely.from_wkb(wkb)
    cols, rows = ~rasterio.open(pred).transform * (shapely.get_x(pts), shapely.get_y(pts))
    rows, cols = np.floor(rows).astype(int), np.floor(cols).astype(int)
    np.testing.assert_array_equal(mask[rows, cols], fields[1])  # each point lies on its map class
    assert len(set(zip(rows, cols))) == 110 and (fields[1] != 255).all()  # distinct, never nodata
    assert all(v is None for v in fields[3])  # reference: empty until labelled
    assert sorted(fields[0].tolist()) == list(range(1, 111))
    # uniform over the class: the 50 of 600 forest pixels spread over its rows and columns
    forest = fields[1] == 1
    assert len(set(rows[forest])) > 20 and len(set(cols[forest])) > 12
    again = draw_sample(pred, tmp_path / "s2.gpkg", per_class=50, seed=1)
    other = draw_sample(pred, tmp_path / "s3.gpkg", per_class=50, seed=2)
    wkb2 = pyogrio.raw.read(tmp_path / "s2.gpkg")[2]
    wkb3 = pyogrio.raw.read(tmp_path / "s3.gpkg")[2]
    assert set(map(bytes, wkb2)) == set(map(bytes, wkb)) != set(map(bytes, wkb3))
    assert again.points == other.points == res.points
    as_json = json.loads(json.dumps(res.to_dict()))  # plain data, as every result gives
    assert as_json == {"path": str(res.path), "points": {str(k): v for k, v in res.points.items()},
                       "map_pixels": {str(k): v for k, v in res.map_pixels.items()}}
    # labelled (with class names, as an analyst types them) as the map says: the estimate is the map itself
    fields[3] = np.array([str(v).upper() for v in fields[2]], object)
    pyogrio.raw.write(tmp_path / "labelled.gpkg", wkb, fields, meta["fields"], crs=meta["crs"],
                      geometry_type="Point", driver="GPKG")
    e = evaluate_vector(pred, tmp_path / "labelled.gpkg", field="reference", stratified=True).stratified
    assert e.overall_accuracy == 1.0 and np.allclose(e.area, e.mapped_area)
    # the same sample against another map: said, as the strata are not those it was drawn from
    other_map = write_raster(tmp_path / "other.tif", np.where(mask == 1, 2, mask).astype(np.uint8), nodata=255)
    with rasterio.open(pred) as a, rasterio.open(other_map, "r+") as b:
        b.update_tags(**a.tags())
    r = runner.invoke(cli, ["evaluate", str(other_map), "--reference", str(tmp_path / "labelled.gpkg"), "--field",
                            "reference", "--stratified"])
    assert r.exit_code == 0 and "50 sample points lie on another class than the map_class" in r.output, r.output
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(tmp_path / "labelled.gpkg"), "--field",
                            "reference", "--stratified"])
    assert r.exit_code == 0 and "another class" not in r.output, r.output
    with pytest.raises(ParameterError, match="no points or polygons with a class"):  # reference: still empty
        evaluate_vector(pred, tmp_path / "s.gpkg", field="reference")
    # the CLI
    r = runner.invoke(cli, ["sample", str(pred), "--out", str(tmp_path / "c.fgb"), "--per-class", "5"])
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "c.fgb"), r.output
    r = runner.invoke(cli, ["sample", str(pred), "--out", str(tmp_path / "c.fgb")])
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = runner.invoke(cli, ["sample", str(pred), "--out", str(tmp_path / "c.shp")])
    assert r.exit_code == 1 and ".gpkg, .geojson or .fgb" in r.output
    r = runner.invoke(cli, ["sample", str(pred), "--out", str(tmp_path / "r.gpkg"), "--region", "30,0,10,30"])
    assert r.exit_code == 0 and len(pyogrio.raw.read(tmp_path / "r.gpkg")[2]) == 10  # only sand there
    assert ("warning: classes [3] have fewer than 50 pixels in the region: all of them were drawn" in r.stderr
            and "warning: classes [1, 2] have no pixel in the region: no points for them" in r.stderr), r.stderr


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_a_geojson_sample_is_in_wgs84_and_round_trips_through_evaluate(tmp_path: Path) -> None:
    import pyogrio
    import rasterio
    import shapely

    from geoseg.evaluate import draw_sample, evaluate_vector

    mask = np.full((30, 40), 1, np.uint8)
    mask[:, 25:] = 2
    pred = write_raster(tmp_path / "map.tif", mask, nodata=255)
    draw_sample(pred, tmp_path / "s.geojson", per_class=20, seed=3)
    doc = json.loads((tmp_path / "s.geojson").read_text())
    assert "crs" not in doc  # RFC 7946: WGS 84, which every reader assumes
    lon, lat = np.array([f["geometry"]["coordinates"] for f in doc["features"]]).T
    assert (np.abs(lon) <= 180).all() and (np.abs(lat) <= 90).all()
    # each point still lies on its map class
    xs, ys = rasterio.warp.transform("EPSG:4326", "EPSG:32633", lon.tolist(), lat.tolist())
    cols, rows = ~rasterio.open(pred).transform * (np.array(xs), np.array(ys))
    assert [int(v) for v in mask[np.floor(rows).astype(int), np.floor(cols).astype(int)]] == \
        [f["properties"]["map_class"] for f in doc["features"]]
    for f in doc["features"]:  # labelled as the map says
        f["properties"]["reference"] = str(f["properties"]["map_class"])
    (tmp_path / "labelled.geojson").write_text(json.dumps(doc))
    assert evaluate_vector(pred, tmp_path / "labelled.geojson", field="reference").metrics.overall_accuracy == 1.0
    # map coordinates in a GeoJSON (GDAL reads them as WGS 84): one line that says so, not a PROJ error
    for f in doc["features"]:
        f["geometry"]["coordinates"] = [500105.0, 4799895.0]
    (tmp_path / "projected.geojson").write_text(json.dumps(doc))
    with pytest.raises(ParameterError, match="not longitudes/latitudes .*WGS 84"):
        evaluate_vector(pred, tmp_path / "projected.geojson", field="reference")
    # a vector file without a CRS is taken to be in the map's, and that is said
    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "labelled.geojson")
    pts = shapely.points(np.array(xs), np.array(ys))
    pyogrio.raw.write(tmp_path / "nocrs.gpkg", shapely.to_wkb(pts), fields, meta["fields"], geometry_type="Point",
                      driver="GPKG")
    with pytest.warns(NoCRSWarning, match="nocrs.gpkg has no CRS: its coordinates are taken to be in the scene's CRS"):
        r = evaluate_vector(pred, tmp_path / "nocrs.gpkg", field="reference")
    assert r.metrics.overall_accuracy == 1.0


def test_an_eval_result_is_plain_json_data(tmp_path: Path) -> None:
    """EvalResult holds paths, numpy metrics and a stratified estimate: ``to_dict()`` (``--json``) is
    what ``json.dumps`` takes, NaN included (as null)."""
    from geoseg.evaluate import draw_sample

    mask = np.full((30, 40), 1, np.uint8)
    mask[:, 25:] = 2
    pred = write_raster(tmp_path / "map.tif", mask, nodata=255)
    draw_sample(pred, tmp_path / "s.gpkg", per_class=10, seed=3)
    import pyogrio.raw

    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "s.gpkg")
    names = list(meta["fields"])
    fields[names.index("reference")] = np.array([str(v) for v in fields[names.index("map_class")]], object)
    pyogrio.raw.write(tmp_path / "labelled.gpkg", wkb, fields, names, geometry_type="Point", driver="GPKG",
                      crs=meta["crs"])
    ev = evaluate_vector(pred, tmp_path / "labelled.gpkg", field="reference", stratified=True, region="0,0,40,30")
    d = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    assert d["prediction"] == str(pred) and d["reference"] == str(tmp_path / "labelled.gpkg")
    assert d["region"] == [0, 0, 40, 30] and d["reference_samples"] == ev.samples
    assert d["overall_accuracy"] == ev.metrics.overall_accuracy == 1.0 and d["class_ids"] == [1, 2]
    assert d["confusion_matrix"] == ev.metrics.confusion.tolist() and d["pixels"] == ev.metrics.total == 20
    assert d["stratified"]["per_class"]["1"]["samples"] == 10 and d["stratified"]["overall_accuracy"] == 1.0
    r = evaluate_rasters(pred, pred)  # no samples, no stratified estimates: those keys are left out
    assert "reference_samples" not in json.loads(json.dumps(r.to_dict(), allow_nan=False))


def test_polygons_against_a_map_without_class_table_count_every_predicted_class(tmp_path: Path) -> None:
    from geoseg.evaluate import evaluate_vector

    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)  # no class table
    # one polygon over the whole raster, all "class 1": the prediction's 2s are errors, not missing predictions
    r = evaluate_vector(pred, _geojson(tmp_path / "all1.geojson", [(_pixel_square(0, 0, 4, 3), {"cls": 1})]),
                        field="cls")
    assert r.metrics.class_ids == (1, 2)
    n1, n2 = int((PRED == 1).sum()), int((PRED == 2).sum())
    np.testing.assert_array_equal(r.metrics.confusion, [[n1, n2], [0, 0]])
    assert r.metrics.unpredicted == 1  # the one nodata pixel


# ---- walkthrough findings: regions, empty results, float labels, ignored points, --record-card -------------
def test_a_region_past_the_raster_is_clipped_with_a_warning_and_echoed_clipped(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    ref = write_raster(tmp_path / "ref.tif", REF, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)
    with pytest.warns(EvaluationWarning, match="^region 2,0,100,100 reaches past the 4x3 raster: clipped to 2,0,2,3$"):
        r = evaluate_rasters(pred, ref, region="2,0,100,100")
    assert r.region == (2, 0, 2, 3)
    np.testing.assert_array_equal(r.metrics.confusion, [[1, 1], [0, 3]])  # as region 2,0,2,3
    xs, ys = _lonlat(np.array([2.5, 3.5]), np.array([0.5, 0.5]))
    pts = _geojson(tmp_path / "p.geojson", [({"type": "Point", "coordinates": [x, y]}, {"cls": 1}) for x, y in zip(xs, ys)])
    with pytest.warns(EvaluationWarning, match="clipped to 2,0,2,3"):
        assert evaluate_vector(pred, pts, field="cls", region="2,0,100,100").region == (2, 0, 2, 3)
    out = runner.invoke(cli, ["-q", "evaluate", str(pred), "--reference", str(ref), "--region", "0,0,100,100", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["region"] == [0, 0, 4, 3]
    # the CLI says it as one line on stderr, as before it was a Python warning
    out = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--region", "0,0,100,100", "--json"])
    assert out.exit_code == 0, out.output
    assert out.stderr.splitlines().count("warning: region 0,0,100,100 reaches past the 4x3 raster: clipped to 0,0,4,3") == 1
    assert "Warning" not in out.stderr and "warning: " not in out.stdout
    with pytest.raises(ParameterError, match="lies outside the 4x3 raster"):
        evaluate_rasters(pred, ref, region="4,0,2,2")


def test_a_region_with_nothing_to_score_is_an_error_that_says_why(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    ref_arr, pred_arr = REF.copy(), PRED.copy()
    pred_arr[0, 2:] = 255  # region 0,0,4,1: two pixels without a prediction ...
    ref_arr[0, :2] = 0  # ... and two unlabelled
    ref = write_raster(tmp_path / "ref.tif", ref_arr, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", pred_arr, nodata=255)
    with pytest.raises(ParameterError, match=r"nothing was scored in region 0,0,4,1: of its 4 pixels, 2 are unlabelled "
                                             r"in ref.tif \(nodata 0 or --ignore 0\) and 2 labelled ones have no "
                                             r"prediction \(nodata in pred.tif\); choose a region where both"):
        evaluate_rasters(pred, ref, region="0,0,4,1")
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--region", "0,0,4,1", "--json"])
    assert r.exit_code == 1 and r.stdout == "" and "nothing was scored" in r.output, r.output
    assert evaluate_rasters(pred, ref, region="0,0,4,2").metrics.total > 0  # a row with data: scored as before


def test_a_float_reference_of_whole_class_ids_is_taken(tmp_path: Path) -> None:
    from geoseg.errors import SceneError

    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)
    as_float = write_raster(tmp_path / "f.tif", REF.astype(np.float32), nodata=0)
    r = evaluate_rasters(pred, as_float, block_rows=1)
    np.testing.assert_array_equal(r.metrics.confusion, CM)
    nan_nodata = write_raster(tmp_path / "nan.tif", np.where(REF == 0, np.nan, REF).astype(np.float64), nodata=np.nan)
    np.testing.assert_array_equal(evaluate_rasters(pred, nan_nodata).metrics.confusion, CM)
    assert evaluate_rasters(pred, nan_nodata).metrics.unknown_reference == 0
    fractional = REF.astype(np.float32)
    fractional[2, 3] = 1.5
    with pytest.raises(SceneError, match=r"not whole class ids \(e.g. 1.5\)"):
        evaluate_rasters(pred, write_raster(tmp_path / "frac.tif", fractional, nodata=0), block_rows=1)


def test_every_reference_point_not_scored_is_accounted_for(tmp_path: Path) -> None:
    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)
    rows, cols = np.indices(REF.shape)
    xs, ys = _lonlat(cols.ravel() + 0.5, rows.ravel() + 0.5)
    ref = _geojson(tmp_path / "pts.geojson", [({"type": "Point", "coordinates": [x, y]}, {"lc": int(v)})
                                              for x, y, v in zip(xs, ys, REF.ravel())])
    with pytest.warns(EvaluationWarning) as warned:
        r = evaluate_vector(pred, ref, field="lc")
    ours = [w for w in warned if issubclass(w.category, GeosegWarning)]
    said = [str(w.message) for w in ours]
    s = r.samples
    assert s["points"] == 12 and s["points_ignored"] == 2 and r.metrics.unpredicted == 1 and r.metrics.total == 9
    assert s["points"] == r.metrics.total + r.metrics.unpredicted + s["points_ignored"]
    assert said == ["2 reference points have class 0, an ignored value (unlabelled; see --ignore): not counted",
                    "1 reference samples (points and polygon pixels) have no prediction (nodata): not counted"]
    # one GeosegWarning each, attributed to the caller's line (not geoseg's), so filters and -W name it
    assert all(w.category is EvaluationWarning for w in ours)
    assert {w.filename for w in ours} == {__file__}
    zeros = _geojson(tmp_path / "zeros.geojson", [({"type": "Point", "coordinates": [xs[8], ys[8]]}, {"lc": 0})])
    with pytest.raises(ParameterError, match=r"falls on a predicted pixel \(1 have an ignored class\): check --field"):
        evaluate_vector(pred, zeros, field="lc")


def test_record_card_checks_come_before_any_output_and_the_record_says_what_was_checked(  # type: ignore[no-untyped-def]
        tmp_path: Path, runner) -> None:
    import rasterio
    import yaml

    from geoseg.card import ClassInfo, ModelCard, default_card
    from geoseg_cli.main import cli

    mc = default_card("unet", 3, 2)  # classes 0, 1
    card = mc.save(tmp_path / "weights.yaml")
    ref = write_raster(tmp_path / "ref.tif", REF, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)
    args = ["evaluate", str(pred), "--reference", str(ref)]
    r = runner.invoke(cli, [*args, "--record-card", str(card)])  # classes 1, 2 do not fit the card
    assert r.exit_code == 1 and "weights.yaml has no class 2" in r.output and r.stdout == "", r.output
    # an export's deploy.yaml (or its folder) is not a model card: say so, and which card to give
    export = tmp_path / "export"
    export.mkdir()
    (export / "deploy.yaml").write_text(yaml.safe_dump({"Deploy": {"model": "model.json"}, "geoseg": mc.to_dict()}))
    for given in (export / "deploy.yaml", export):
        r = runner.invoke(cli, [*args, "--record-card", str(given)])
        assert r.exit_code == 1 and r.stdout == "" and "is an export's" in r.output, r.output
        assert "not a model card: give the card of the weights it was exported from" in r.output
        assert "lacks the field" not in r.output
    # recorded: what evaluate knows (no tile size/overlap claim), and that only the model name was checked
    fits = mc.replace(classes=(ClassInfo(1, "a", (1, 1, 1)), ClassInfo(2, "b", (2, 2, 2)))).save(tmp_path / "m.yaml")
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(GEOSEG_MODEL=mc.name)
    r = runner.invoke(cli, ["-q", *args, "--record-card", str(fits)])
    assert r.exit_code == 0, r.output
    test = ModelCard.load(fits).metrics["test"]
    assert "tile size" not in str(test) and test["prediction"] == "pred.tif" and test["how"] == "geoseg evaluate"
    assert f"model name '{mc.name}' (the mask's GEOSEG_MODEL tag" in test["checked"] and "seeds" in test["checked"]
    assert "GEOSEG_MODEL" in runner.invoke(cli, ["evaluate", "--help"]).output


def test_record_card_in_a_folder_it_cannot_write_is_refused_before_any_output(  # type: ignore[no-untyped-def]
        tmp_path: Path, runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card in a read-only folder was found out after the whole table was printed, as "output folder ... is
    not writable: choose another --out" (evaluate has no --out); a full disk named no file."""
    import errno
    import os

    from geoseg.card import ClassInfo, ModelCard, default_card
    from geoseg_cli.main import cli

    mc = default_card("unet", 3, 2)
    card = mc.replace(classes=(ClassInfo(1, "a", (1, 1, 1)), ClassInfo(2, "b", (2, 2, 2)))).save(tmp_path / "m.yaml")
    ref = write_raster(tmp_path / "ref.tif", REF, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, nodata=255)
    args = ["evaluate", str(pred), "--reference", str(ref), "--record-card", str(card)]
    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path and real_access(p, mode, **kw))
        r = runner.invoke(cli, args)
    assert r.exit_code == 1 and r.stdout == "", r.output
    assert f"cannot record in {card}: its folder {tmp_path} is not writable" in r.stderr and "--out" not in r.stderr
    import geoseg.atomic

    def full(*a: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(geoseg.atomic, "atomic_write_text", full)  # (card.save imports it when it runs)
    r = runner.invoke(cli, args)
    assert r.exit_code == 1 and f"cannot write {card}: no space left on the device: free some space or choose " \
        "another --record-card" in r.stderr, r.output
    assert ModelCard.load(card).metrics == {}


# ---- review findings: nodata, wide and negative ids, unsampled strata, mask bands ----------------------------
def _sample_points(path: Path, cells: list[tuple[int, int]], labels: list[int]) -> Path:
    """Points at the centres of (row, col) pixels of write_raster's default grid, with class ``cls``."""
    rows, cols = np.array([r for r, _ in cells]), np.array([c for _, c in cells])
    xs, ys = _lonlat(cols + 0.5, rows + 0.5)
    return _geojson(path, [({"type": "Point", "coordinates": [x, y]}, {"cls": int(v)})
                           for x, y, v in zip(xs, ys, labels)])


def _ours(warned: list) -> list[str]:  # type: ignore[type-arg]
    return [str(w.message) for w in warned if issubclass(w.category, GeosegWarning)]


def test_prediction_nodata_is_not_counted_where_the_reference_has_that_value_as_a_class(tmp_path: Path) -> None:
    pred = np.ones((6, 6), np.uint8)
    pred[:, 3:] = 2
    pred[:3] = 255  # top half: no prediction
    ref = pred.copy()
    ref[:3] = 1
    ref[:1] = 255  # the reference's unlabelled value, without a nodata tag: a class of the reference
    cm = ConfusionMatrix([1, 2, 255], ignore_prediction=[255])
    cm.update(ref, pred)
    ok = pred != 255
    np.testing.assert_array_equal(cm.matrix, [[9, 0, 0], [0, 9, 0], [0, 0, 0]])
    assert cm.unpredicted == int((~ok).sum()) == 18
    with pytest.warns(EvaluationWarning, match="18 labelled reference pixels have no prediction"):
        m = evaluate_rasters(write_raster(tmp_path / "p.tif", pred, nodata=255),
                             write_raster(tmp_path / "r.tif", ref)).metrics
    assert m.total == int(ok.sum()) and m.unpredicted == 18
    assert m.overall_accuracy == pytest.approx(float((pred[ok] == ref[ok]).mean())) == 1.0
    # a mask band hides predictions like a nodata value does (and is as unpredicted)
    cm = ConfusionMatrix([1, 2])
    cm.update(np.array([1, 2, 2]), np.array([1, 1, 2]), predicted=np.array([True, False, True]))
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 1]])
    assert cm.unpredicted == 1


def test_255_is_a_class_of_a_wider_map_whose_nodata_is_another_value(tmp_path: Path) -> None:
    import pyogrio

    from geoseg.evaluate import draw_sample

    a = np.ones((6, 9), np.uint16)
    a[:, 3:6] = 255
    a[:, 6:] = 300
    a[0, 0] = 65535  # the map's nodata
    pred = write_raster(tmp_path / "u16.tif", a, nodata=65535)
    res = draw_sample(pred, tmp_path / "s.gpkg", per_class=3)
    present = {int(v): int(n) for v, n in zip(*np.unique(a[a != 65535], return_counts=True))}
    assert res.points == {1: 3, 255: 3, 300: 3} and res.map_pixels == present == {1: 17, 255: 18, 300: 18}
    assert sorted(pyogrio.raw.read(tmp_path / "s.gpkg")[3][1].tolist()) == [1] * 3 + [255] * 3 + [300] * 3
    ref_arr = np.where(a == 300, 300, 1).astype(np.uint16)  # no class 255 in the reference
    ref = write_raster(tmp_path / "ref.tif", ref_arr)
    with pytest.warns(EvaluationWarning, match="^1 labelled reference pixels have no prediction"):  # the 65535
        m = evaluate_rasters(pred, ref).metrics
    ok = a != 65535
    assert m.class_ids == (1, 255, 300) and m.total == int(ok.sum()) == 53 and m.unpredicted == 1
    assert m.overall_accuracy == pytest.approx(float((a[ok] == ref_arr[ok]).mean()))
    # classes without 255: its pixels are errors, said, not pixels without a prediction
    with pytest.warns(EvaluationWarning, match=r"prediction values \[255\] are not among the classes \[1, 300\]: "
                                               "counted as errors") as warned:
        m = evaluate_rasters(pred, ref, classes=[1, 300]).metrics
    assert m.class_ids == (1, 300, 255) and m.total == 53 and m.unpredicted == 1
    assert m.confusion[0, 2] == 18 and m.overall_accuracy == pytest.approx(35 / 53)
    assert [w for w in _ours(warned) if "have no prediction" in w] == [
        "1 labelled reference pixels have no prediction (nodata): not counted"]
    # in a uint8 map, 255 is geoseg's nodata, tag or not
    u8 = write_raster(tmp_path / "u8.tif", np.where(a == 255, 255, 1).astype(np.uint8))
    with pytest.warns(EvaluationWarning, match="18 labelled reference pixels have no prediction"):
        assert evaluate_rasters(u8, ref).metrics.total == 54 - 18


def test_negative_and_huge_class_ids_are_matched_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    import geoseg.evaluate

    cm = ConfusionMatrix([-5, 1, 2])
    cm.update(np.array([-5, 1, 2, -5]), np.array([-5, 1, 2, 2]))
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    cm = ConfusionMatrix([1, 2, -2, 4])  # 3 is not a class (it is not class -2)
    cm.update(np.array([3, 3, 1, -2]), np.array([1, 2, 1, -2]))
    np.testing.assert_array_equal(cm.matrix, np.diag([1, 0, 1, 0]))
    assert cm.unknown_reference == 2
    cm = ConfusionMatrix([-1, 1], ignore_reference=[0])  # -1 is no value of a uint8 array, 255 no class
    cm.update(np.array([255, 1, 0], np.uint8), np.array([1, 1, 1], np.int16))
    np.testing.assert_array_equal(cm.matrix, [[0, 0], [0, 1]])
    assert cm.unknown_reference == 1
    # an int16 reference whose -1 (no nodata tag) is a class: counted, as errors
    pred = np.ones((5, 6), np.int16)
    pred[:, 3:] = 2
    ref = pred.copy()
    ref[:2] = -1
    m = evaluate_rasters(write_raster(tmp_path / "p.tif", pred), write_raster(tmp_path / "r.tif", ref)).metrics
    assert m.class_ids == (-1, 1, 2) and m.total == 30 and m.unknown_reference == 0
    assert m.support.tolist() == [12, 9, 9]
    assert m.overall_accuracy == pytest.approx(float((pred == ref).mean())) == 0.6
    # reference values left out of the classes would not be counted: said
    monkeypatch.setattr(geoseg.evaluate, "_with_reference_ids", lambda ids, ref_ids, *_, **__: ids)
    with pytest.warns(EvaluationWarning, match=r"12 reference pixels hold values that are not among the classes "
                                               r"\[1, 2\]: not counted"):
        evaluate_rasters(tmp_path / "p.tif", tmp_path / "r.tif", classes=[1, 2])
    monkeypatch.undo()
    # a huge value costs no table of its size (the old one: 8 bytes per value up to the largest id)
    cm = ConfusionMatrix([1, 2])
    tracemalloc.start()
    try:
        cm.update(np.array([1, 2**25, 2], np.uint32), np.array([1, 1, 2], np.uint8))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20 and cm.unknown_reference == 1
    np.testing.assert_array_equal(cm.matrix, np.eye(2))
    big = np.ones((3, 3), np.uint32)
    big[0, 0] = 2**32 - 1
    m = evaluate_rasters(write_raster(tmp_path / "p8.tif", np.ones((3, 3), np.uint8)),
                         write_raster(tmp_path / "big.tif", big)).metrics
    assert m.class_ids == (1, 2**32 - 1) and m.total == 9 and m.overall_accuracy == pytest.approx(8 / 9)


def test_a_map_class_without_sample_points_stays_a_stratum_and_leaves_the_totals_unestimated(  # type: ignore[no-untyped-def]
        tmp_path: Path, runner) -> None:
    import rasterio

    from geoseg.card import ClassInfo
    from geoseg.io import classes_tag
    from geoseg.metrics import stratified_estimates
    from geoseg_cli.main import cli

    e = stratified_estimates(np.array([[5, 0], [0, 0]]), [10, 10], [1, 2])
    assert np.isnan(e.overall_accuracy) and np.isnan(e.users_accuracy[1])  # not 0.5: stratum 2 is not all wrong
    assert np.isnan(e.area).all() and np.isnan(e.producers_accuracy).all() and list(e.mapped_area) == [10, 10]
    assert e.unsampled == (2,) and e.users_accuracy[0] == 1.0
    mask = np.ones((8, 8), np.uint8)
    mask[:, 4:] = 2  # 32 pixels each; the sample (every point right) only hit class 1
    cells = [(r, c) for r in range(0, 8, 2) for c in range(0, 4, 2)]
    pts = _sample_points(tmp_path / "pts.geojson", cells, [1] * len(cells))
    plain = write_raster(tmp_path / "plain.tif", mask, nodata=255)
    tabled = write_raster(tmp_path / "tabled.tif", mask, nodata=255)
    with rasterio.open(tabled, "r+") as ds:
        ds.update_tags(**classes_tag([ClassInfo(1, "a", (1, 1, 1)), ClassInfo(2, "b", (2, 2, 2))]))
    for pred in (plain, tabled):
        with pytest.warns(EvaluationWarning) as warned:
            r = evaluate_vector(pred, pts, field="cls", stratified=True)
        e = r.stratified
        assert e.class_ids == (1, 2) and list(e.samples) == [8, 0] and list(e.map_pixels) == [32, 32]
        assert e.mapped_area.sum() == pytest.approx(64 * 100.0)  # the region's area: no stratum lost
        assert e.unsampled == (2,) and e.users_accuracy[0] == 1.0
        assert np.isnan(e.overall_accuracy) and np.isnan(e.area).all() and np.isnan(e.producers_accuracy).all()
        said = [w for w in _ours(warned) if "no sample point" in w]
        assert len(said) == 1 and said[0].startswith("map classes [2] have pixels but no sample point")
        assert r.metrics.overall_accuracy == 1.0  # the plain sample figures stand
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))["stratified"]
    assert d["overall_accuracy"] is None and d["unsampled_classes"] == [2] and d["per_class"]["1"]["area"] is None
    out = runner.invoke(cli, ["evaluate", str(plain), "--reference", str(pts), "--field", "cls", "--stratified"])
    assert out.exit_code == 0 and "overall acc.   -  (areas in m2)" in out.stdout, out.output


def test_sample_and_strata_take_negative_and_wide_class_ids(tmp_path: Path) -> None:
    import rasterio.transform

    from geoseg.evaluate import draw_sample

    pyproj = pytest.importorskip("pyproj")
    a = np.full((6, 6), -1, np.int16)
    a[:, 3:] = 2
    a[0, 0] = -9999
    res = draw_sample(write_raster(tmp_path / "i16.tif", a, nodata=-9999), tmp_path / "s16.gpkg", per_class=4)
    assert res.points == {-1: 4, 2: 4} and res.map_pixels == {-1: int((a == -1).sum()), 2: 18}
    # labelled (as the map says, "-1" typed as text) and assessed: negative ids were refused in a vector
    # reference ("must hold whole class ids >= 0"), so a sample of this map could not be evaluated
    import pyogrio

    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "s16.gpkg")
    fields[-1] = np.array([str(v) for v in fields[1]], object)
    pyogrio.raw.write(tmp_path / "l16.gpkg", wkb, fields, meta["fields"], crs=meta["crs"], geometry_type="Point",
                      driver="GPKG")
    e = evaluate_vector(tmp_path / "i16.tif", tmp_path / "l16.gpkg", field="reference", stratified=True)
    assert e.metrics.class_ids == (-1, 2) and e.metrics.overall_accuracy == 1.0 and e.samples["points"] == 8
    assert e.stratified is not None and e.stratified.overall_accuracy == 1.0
    b = np.full((6, 6), 70000, np.int32)
    b[:, 3:] = 2
    pred = write_raster(tmp_path / "i32.tif", b)
    res = draw_sample(pred, tmp_path / "s32.gpkg", per_class=4)
    assert res.points == {2: 4, 70000: 4} and res.map_pixels == {2: 18, 70000: 18}
    cells = [(r, c) for r in range(0, 6, 2) for c in range(6)]
    e = evaluate_vector(pred, _sample_points(tmp_path / "p.geojson", cells, [int(b[rc]) for rc in cells]),
                        field="cls", stratified=True).stratified
    assert e.class_ids == (2, 70000) and list(e.map_pixels) == [18, 18] and e.overall_accuracy == 1.0
    np.testing.assert_allclose(e.area, [1800.0, 1800.0])
    # on a degree grid, the strata's ground areas
    c = np.where(np.arange(4)[:, None] < 2, 3, 70000) * np.ones((4, 3), np.int32)
    deg = write_raster(tmp_path / "deg.tif", c.astype(np.int32), crs="EPSG:4326",
                       transform=rasterio.transform.from_origin(0.0, 40.0, 1.0, 1.0))
    feats = [({"type": "Point", "coordinates": [col + 0.5, 40 - r - 0.5]}, {"cls": int(c[r, col])})
             for r in range(4) for col in range(3)]
    e = evaluate_vector(deg, _geojson(tmp_path / "d.geojson", feats), field="cls", stratified=True).stratified
    geod = pyproj.Geod(ellps="WGS84")
    row = [abs(geod.polygon_area_perimeter([0, 1, 1, 0], [40 - r, 40 - r, 39 - r, 39 - r])[0]) for r in range(4)]
    assert e.class_ids == (3, 70000)
    np.testing.assert_allclose(e.mapped_area, [3 * (row[0] + row[1]), 3 * (row[2] + row[3])], rtol=1e-9)


def test_a_mask_band_hides_pixels_from_sample_and_evaluate(tmp_path: Path) -> None:
    import pyogrio
    import rasterio
    import shapely

    from geoseg.evaluate import draw_sample

    a = np.ones((6, 8), np.uint8)
    a[:, 4:] = 2
    shown = np.ones(a.shape, bool)
    shown[:, 6:] = False  # the right quarter: no data, by the mask band (no nodata value)
    pred = write_raster(tmp_path / "mb.tif", a, masks=shown)
    with rasterio.open(pred) as ds:
        assert ds.nodata is None and rasterio.enums.MaskFlags.per_dataset in ds.mask_flag_enums[0]
    res = draw_sample(pred, tmp_path / "s.gpkg", per_class=100)
    assert res.map_pixels == {1: 24, 2: 12} and res.points == {1: 24, 2: 12}
    wkb = pyogrio.raw.read(tmp_path / "s.gpkg")[2]
    pts = shapely.from_wkb(wkb)
    cols, rows = ~rasterio.open(pred).transform * (shapely.get_x(pts), shapely.get_y(pts))
    assert shown[rows.astype(int), cols.astype(int)].all()
    # evaluate: the hidden prediction pixels have no prediction; a reference's hidden pixels no label
    ref_arr = np.full(a.shape, 2, np.uint8)
    ref_shown = np.ones(a.shape, bool)
    ref_shown[:2] = False
    ref = write_raster(tmp_path / "ref.tif", ref_arr, masks=ref_shown)
    with pytest.warns(EvaluationWarning, match="8 labelled reference pixels have no prediction"):
        m = evaluate_rasters(pred, ref).metrics
    both = shown & ref_shown
    assert m.total == int(both.sum()) == 24 and m.unpredicted == int((ref_shown & ~shown).sum())
    assert m.overall_accuracy == pytest.approx(float((a[both] == ref_arr[both]).mean()))
    # points on hidden pixels have no prediction; the strata count the shown pixels only
    cells = [(r, c) for r in range(6) for c in (1, 5, 7)]
    r = evaluate_vector(pred, _sample_points(tmp_path / "p.geojson", cells, [int(a[rc]) for rc in cells]),
                        field="cls", stratified=True)
    assert r.metrics.total == 12 and r.metrics.unpredicted == 6 and r.metrics.overall_accuracy == 1.0
    assert list(r.stratified.map_pixels) == [24, 12]


def test_stratified_class_zero_of_a_raw_map_is_a_stratum_and_a_no_data_tag_none(tmp_path: Path) -> None:
    """A map without a class table whose classes are 0, 1, 2: the 0 pixels were a stratum while a reference
    0 was "unlabelled" by default, so that stratum was never sampled (overall accuracy 0.47 for 0.89, class
    0's area 0). And a map whose CLASSES tag says 0=no_data (no nodata value): sample drew points on it and
    evaluate made it a stratum no reference could ever hold."""
    import pyogrio.raw
    import rasterio

    from geoseg.evaluate import draw_sample, evaluate_vector

    mask = np.zeros((20, 30), np.uint8)
    mask[:, 10:20], mask[:, 20:] = 1, 2
    pred = write_raster(tmp_path / "raw.tif", mask)
    res = draw_sample(pred, tmp_path / "s.gpkg", per_class=5, seed=0)
    assert res.points == {0: 5, 1: 5, 2: 5}
    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "s.gpkg")
    ref = fields[1].astype(np.int64)  # labelled as the map says, 0 included
    out = tmp_path / "ref.gpkg"
    with rasterio.open(pred) as ds:
        pyogrio.raw.write(out, wkb, [ref], ["reference"], geometry_type="Point", crs=ds.crs.to_wkt())
    e = evaluate_vector(pred, out, field="reference", stratified=True)
    assert e.stratified is not None and e.metrics.class_ids == (0, 1, 2)
    assert e.stratified.overall_accuracy == pytest.approx(1.0)
    # a CLASSES tag naming 0 as no data: no stratum, no sample point on it
    with rasterio.open(pred, "r+") as ds:
        ds.update_tags(1, CLASSES="0=no_data,1=a,2=b")
    res = draw_sample(pred, tmp_path / "s2.gpkg", per_class=5, seed=0)
    assert res.points == {1: 5, 2: 5} and 0 not in res.map_pixels


def test_an_undefined_stratified_estimate_has_no_interval_either() -> None:
    """A class only in the reference has no user's accuracy: its JSON said users_accuracy null with
    users_accuracy_ci 0.0, an interval of certainty around nothing."""
    from geoseg.metrics import stratified_estimates

    d = stratified_estimates(np.array([[5, 1, 1], [0, 6, 0], [0, 0, 0]]), [100, 50, 0], [1, 2, 3]).to_dict()
    third = d["per_class"]["3"]
    assert third["users_accuracy"] is None and third["users_accuracy_ci"] is None
    assert third["producers_accuracy"] == 0.0 and third["area"] is not None and third["area_ci"] is not None
    assert d["per_class"]["1"]["users_accuracy_ci"] is not None


def test_sample_and_evaluate_refuse_what_is_no_class_map(tmp_path: Path) -> None:
    """A float map with NaN ended in "unexpected error: ValueError"; an image (several bands, or a
    uint16 band of thousands of grey values) drew a point per grey value, as vectorize refuses it."""
    import rasterio

    from geoseg.errors import SceneError
    from geoseg.evaluate import draw_sample

    rng = np.random.default_rng(0)
    floats = rng.integers(1, 4, (20, 20)).astype(np.float32)
    floats[:3] = np.nan
    pan = rng.integers(0, 4000, (64, 64)).astype(np.uint16)
    bad = {
        "float32 values": write_raster(tmp_path / "f.tif", floats),
        "3 bands": write_raster(tmp_path / "rgb.tif", rng.integers(0, 256, (3, 20, 20)).astype(np.uint8)),
        "distinct values in a sample and no class names": write_raster(tmp_path / "pan.tif", pan),
    }
    for words, path in bad.items():
        with pytest.raises(SceneError, match=words):
            draw_sample(path, tmp_path / "s.gpkg")
        assert not (tmp_path / "s.gpkg").exists()
    with pytest.raises(SceneError, match="distinct values.*give --classes with them"):
        evaluate_rasters(bad["distinct values in a sample and no class names"],
                         write_raster(tmp_path / "ref.tif", np.ones((64, 64), np.uint8)))
    # the ids given, or named in band 1's CLASSES tag: a map of many classes is one
    m = evaluate_rasters(bad["distinct values in a sample and no class names"], tmp_path / "ref.tif",
                         classes=[1, 2]).metrics
    assert m.total == 64 * 64
    with rasterio.open(tmp_path / "pan.tif", "r+") as ds:
        ds.update_tags(1, CLASSES=",".join(f"{v}=c{v}" for v in range(4000)))
    res = draw_sample(tmp_path / "pan.tif", tmp_path / "s.gpkg", per_class=1)
    assert sum(res.points.values()) == len(np.unique(pan))


def test_sample_names_points_by_a_band_classes_tag_and_takes_uint8_255_as_no_data(tmp_path: Path) -> None:
    import pyogrio
    import rasterio

    from geoseg.evaluate import draw_sample

    a = np.ones((8, 8), np.uint8)
    a[:, 4:] = 2
    a[0] = 255
    path = write_raster(tmp_path / "m.tif", a)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(1, CLASSES="1=forest,2=water")
    with pytest.warns(EvaluationWarning, match="no nodata value: its pixels of value 255 are taken as no data"):
        res = draw_sample(path, tmp_path / "s.gpkg", per_class=100)
    assert res.points == {1: 28, 2: 28}
    info, _, _, fields = pyogrio.raw.read(tmp_path / "s.gpkg")
    names = dict(zip(fields[list(info["fields"]).index("map_class")], fields[list(info["fields"]).index("map_name")]))
    assert names == {1: "forest", 2: "water"}
    # with another nodata value, 255 is a class to sample and evaluate alike (as to vectorize)
    other = write_raster(tmp_path / "n0.tif", a, nodata=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert draw_sample(other, tmp_path / "s0.gpkg", per_class=5).points == {1: 5, 2: 5, 255: 5}
    ref = write_raster(tmp_path / "ref.tif", np.where(a == 255, 255, 1).astype(np.uint8))
    m = evaluate_rasters(other, ref).metrics
    assert 255 in m.class_ids and m.total == 64 and m.unpredicted == 0


def test_sample_tells_of_visible_255s_of_a_masked_uint8_map_only(tmp_path: Path) -> None:
    """With a mask band, the 255s it hides were the only ones sample looked past, without a word about
    the visible ones (vectorize refused such a map)."""
    import rasterio

    from geoseg.evaluate import draw_sample

    a = np.ones((8, 8), np.uint8)
    a[:, 4:] = 2
    a[:, 0] = 255
    for name, visible in (("hidden.tif", False), ("shown.tif", True)):
        path = write_raster(tmp_path / name, a)
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
            ds.write_mask(np.where((a == 255) & (not visible), 0, 255).astype(np.uint8))
        with warnings.catch_warnings(record=True) as told:
            warnings.simplefilter("always")
            res = draw_sample(path, tmp_path / f"{name}.gpkg", per_class=100)
        assert res.points == {1: 24, 2: 32}
        assert len([w for w in told if "value 255 are taken as no data" in str(w.message)]) == int(visible)


def test_gdal_category_names_in_an_aux_xml_name_a_class_raster_s_classes(tmp_path: Path) -> None:
    """A label raster named by its .aux.xml's CategoryNames (QGIS, ArcGIS, gdal_edit and geoseg's masks write
    them; rasterio does not read them) had its classes called class_1, class_2 ..."""
    import pyogrio
    import rasterio

    from geoseg.evaluate import draw_sample
    from geoseg.io import band_class_names, category_names
    from geoseg.vectorize import vectorize_mask

    a = np.ones((20, 20), np.uint16)
    a[:, 10:] = 3
    a[:, :2] = 0
    path = write_raster(tmp_path / "lab.tif", a, nodata=0)
    Path(f"{path}.aux.xml").write_text(
        '<PAMDataset><PAMRasterBand band="1"><CategoryNames><Category>none</Category><Category> forest</Category>'
        "<Category/><Category>water &amp; wetland</Category></CategoryNames></PAMRasterBand></PAMDataset>")
    with rasterio.open(path) as ds:
        assert category_names(ds) == {0: "none", 1: "forest", 3: "water & wetland"} == band_class_names(ds)
    with rasterio.open(path, "r+") as ds:  # a CLASSES tag wins over the sidecar
        ds.update_tags(1, CLASSES="1=trees")
    with rasterio.open(path) as ds:
        assert band_class_names(ds) == {1: "trees"}
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(1, CLASSES="")
    vectorize_mask(path, tmp_path / "v.gpkg", simplify=0)
    info, _, _, fields = pyogrio.raw.read(tmp_path / "v.gpkg")
    names = dict(zip(fields[list(info["fields"]).index("class_id")], fields[list(info["fields"]).index("class_name")]))
    assert names == {1: "forest", 3: "water & wetland"}
    draw_sample(path, tmp_path / "s.gpkg", per_class=3)
    info, _, _, fields = pyogrio.raw.read(tmp_path / "s.gpkg")
    names = dict(zip(fields[list(info["fields"]).index("map_class")], fields[list(info["fields"]).index("map_name")]))
    assert names == {1: "forest", 3: "water & wetland"}
    # no sidecar, or a malformed one: no names
    Path(f"{path}.aux.xml").write_text("<PAMDataset><PAMRasterBand band=")
    with rasterio.open(path) as ds:
        assert category_names(ds) == {}


def test_a_class_map_with_cubic_overviews_is_not_taken_for_an_image(tmp_path: Path) -> None:
    """A decimated read is served from the overviews: a COG's CUBIC overviews (GDAL's default without a colour
    table) of a uint16 map of 8 codes held hundreds of values, and evaluate and sample refused it as an image."""
    import rasterio
    from rasterio.enums import Resampling

    from geoseg.evaluate import draw_sample
    from geoseg.io import image_values

    rng = np.random.default_rng(3)
    codes = np.array([112, 211, 311, 312, 411, 512, 611, 711], np.uint16)
    a = codes[np.kron(rng.integers(0, 8, (64, 64)), np.ones((8, 8), int))]
    path = write_raster(tmp_path / "codes.tif", a, tiled=True, blockxsize=128, blockysize=128)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.cubic)
    with rasterio.open(path) as ds:
        assert np.unique(ds.read(1, out_shape=(256, 256))).size > 256  # what the old check saw
        assert image_values(ds) is None
    m = evaluate_rasters(path, path).metrics
    assert m.overall_accuracy == 1.0 and m.total == a.size
    assert sorted(draw_sample(path, tmp_path / "s.gpkg", per_class=2).points) == codes.tolist()
    pan = write_raster(tmp_path / "pan.tif", rng.integers(0, 4000, (512, 512)).astype(np.uint16))
    with rasterio.open(pan) as ds:  # an image is still one
        assert image_values(ds) > 256


def test_a_uint8_map_that_names_255_as_a_class_keeps_it(tmp_path: Path) -> None:
    """A 0/255 building mask tagged 0=background,255=building, without a nodata value: 255 was no data to
    vectorize (no building polygon), evaluate and sample; named as no data, or not named, it still is."""
    import pyogrio
    import rasterio

    from geoseg.evaluate import draw_sample
    from geoseg.vectorize import vectorize_mask

    a = np.zeros((16, 16), np.uint8)
    a[2:6, 2:6] = a[9:14, 8:15] = 255
    for tag, kept in (("0=background,255=building", True), ("0=background,255=no data", False), ("", False)):
        path = write_raster(tmp_path / "b.tif", a)
        with rasterio.open(path, "r+") as ds:
            ds.update_tags(1, CLASSES=tag)
        with warnings.catch_warnings(record=True) as told:
            warnings.simplefilter("always")
            vectorize_mask(path, tmp_path / "b.gpkg", simplify=0, overwrite=True)
            points = draw_sample(path, tmp_path / "s.gpkg", per_class=2, overwrite=True).points
            m = evaluate_rasters(path, path, ignore=[]).metrics
        warned = [w for w in told if "value 255 are taken as no data" in str(w.message)]
        assert len(warned) == (0 if kept else 2), [str(w.message) for w in told]
        info, _, _, fields = pyogrio.raw.read(tmp_path / "b.gpkg")
        got = set(zip(fields[list(info["fields"]).index("class_id")], fields[list(info["fields"]).index("class_name")]))
        assert got == ({(0, "background"), (255, "building")} if kept else {(0, "background" if tag else "class_0")})
        assert sorted(points) == ([0, 255] if kept else [0])
        # as a prediction: 255 predicted, or no prediction (the reference's 255s then left uncounted)
        assert (m.total, m.unpredicted) == ((a.size, 0) if kept else ((a == 0).sum(), (a == 255).sum()))
        # the table names them as vectorize and sample do (it said class_0 and class_255)
        assert m.names == ({0: "background", 255: "building"} if kept else {0: "background"} if tag else {})


def test_a_model_class_named_like_no_data_counts_in_geoseg_s_own_mask(tmp_path: Path) -> None:
    """A model's class "none" (or "unknown", as DeepGlobe's) reached evaluate and sample as "no prediction"
    through the category names of the mask's .aux.xml: a map 9 % wrong scored OA 1, and sample drew no point
    of it."""
    import rasterio

    from geoseg.card import ClassInfo
    from geoseg.evaluate import draw_sample
    from geoseg.io import CLASSES_TAG, write_aux_xml

    table = [ClassInfo(1, "none", (0, 0, 0)), ClassInfo(2, "minor", (9, 9, 9)), ClassInfo(3, "major", (99, 9, 9))]
    ref = np.tile(np.repeat(np.array([1, 2, 3], np.uint8), 6), (18, 1))
    pred = ref.copy()
    pred[:3] = 1  # wrong as class "none"
    path = write_raster(tmp_path / "p.tif", pred, nodata=255)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(**{CLASSES_TAG: json.dumps([{"id": c.id, "name": c.name, "color": list(c.color)}
                                                   for c in table])})
    write_aux_xml(path, table)
    m = evaluate_rasters(path, write_raster(tmp_path / "r.tif", ref)).metrics
    assert m.total == ref.size and m.unpredicted == 0 and m.overall_accuracy < 1
    assert sorted(draw_sample(path, tmp_path / "s.gpkg", per_class=2).points) == [1, 2, 3]


def test_sample_on_a_full_disk_is_one_line_naming_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk ended sample in "unexpected error: DataSourceError: sqlite3_exec(CREATE TABLE ..." (GeoPackage),
    "FeatureError: Could not add feature" (GeoJSON), as vectorize's own line says it."""
    import pyogrio.errors
    import pyogrio.raw

    from geoseg.errors import NoRoomError
    from geoseg.evaluate import draw_sample

    a = np.ones((8, 8), np.uint8)
    path = write_raster(tmp_path / "m.tif", a, nodata=0)
    (tmp_path / "s.gpkg").write_bytes(b"the old sample")
    for error in (pyogrio.errors.DataSourceError, pyogrio.errors.FeatureError, OSError):
        def full(*args: object, error: type = error, **kw: object) -> None:
            raise error("sqlite3_exec(CREATE TABLE gpkg_spatial_ref_sys ...) failed: No space left on device")

        monkeypatch.setattr(pyogrio.raw, "write", full)
        with pytest.raises(NoRoomError, match=r"^cannot write .*s.gpkg: no space left on the device: free some space"):
            draw_sample(path, tmp_path / "s.gpkg", per_class=2, overwrite=True)
    assert (tmp_path / "s.gpkg").read_bytes() == b"the old sample"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "s.gpkg"]


def test_reference_classes_that_classes_given_leave_out_are_told_as_such(tmp_path: Path) -> None:
    """--classes 99: "reference classes [1, 2] are not among the predicted classes [99]: counted as errors",
    though the prediction held them and none was counted as an error."""
    ref = np.tile(np.array([1, 1, 2, 2], np.uint8), (4, 1))
    pred = write_raster(tmp_path / "p.tif", ref, nodata=255)
    with pytest.warns(EvaluationWarning, match=r"^reference classes \[1, 2\] are not among the classes given \[99\]: "
                                               "counted as classes too$"):
        m = evaluate_rasters(pred, write_raster(tmp_path / "r.tif", ref), classes=[99]).metrics
    assert m.overall_accuracy == 1.0 and m.total == ref.size


def test_a_folder_named_like_a_geotiff_is_said_to_be_a_folder(tmp_path: Path) -> None:
    """predict and info said so; vectorize, evaluate and sample said GDAL's "not recognized as being in a
    supported file format"."""
    from geoseg.errors import SceneReadError
    from geoseg.evaluate import draw_sample
    from geoseg.vectorize import vectorize_mask

    folder = tmp_path / "dir.tif"
    folder.mkdir()
    good = write_raster(tmp_path / "m.tif", np.ones((4, 4), np.uint8))
    for run in (lambda: vectorize_mask(folder, tmp_path / "v.gpkg"), lambda: evaluate_rasters(folder, good),
                lambda: evaluate_rasters(good, folder), lambda: draw_sample(folder, tmp_path / "s.gpkg")):
        with pytest.raises(SceneReadError, match="dir.tif is a folder"):
            run()


def test_a_reference_class_that_is_the_maps_nodata_is_said_so(tmp_path: Path) -> None:
    """"counted as errors" beside "not counted" read as a contradiction when the map's nodata is 0."""
    a = np.tile(np.arange(4, dtype=np.uint8), (8, 2))
    pred = write_raster(tmp_path / "p.tif", a, nodata=0)
    ref = write_raster(tmp_path / "r.tif", a[::-1].copy())
    with pytest.warns(EvaluationWarning, match=r"classes \[0\] are not among .* counted as errors where the map has a "
                                               r"prediction \(0 is the prediction's nodata: it cannot predict them\)"):
        evaluate_rasters(pred, ref, ignore=[])


def test_long_lists_of_classes_in_messages_are_cut(tmp_path: Path) -> None:
    from geoseg.evaluate import draw_sample

    a = np.arange(200, dtype=np.int16).reshape(10, 20)
    with pytest.warns(EvaluationWarning) as seen:
        draw_sample(write_raster(tmp_path / "m.tif", a), tmp_path / "s.gpkg", per_class=2)
    text = next(str(w.message) for w in seen if w.category is EvaluationWarning)
    assert "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ..., 198, 199] (200 in all)" in text and len(text) < 200


def test_a_mask_of_part_of_the_reference_grid_is_compared_there(tmp_path: Path) -> None:
    """A predict --aoi mask (whole pixels of the scene's grid) against the scene's label raster was refused:
    "grids do not match ... resample one onto the other"."""
    from affine import Affine

    rng = np.random.default_rng(0)
    ref = rng.integers(1, 4, (40, 50)).astype(np.uint8)
    ref[:3] = 0  # unlabelled
    t = from_origin(500000.0, 4800000.0, 10.0, 10.0)
    ref_path = write_raster(tmp_path / "ref.tif", ref, transform=t)
    pred = np.where(rng.random((20, 24)) < 0.7, ref[2:22, 10:34], 1).astype(np.uint8)
    part = write_raster(tmp_path / "part.tif", pred, transform=t * Affine.translation(10, 2), nodata=255)
    crop = write_raster(tmp_path / "crop.tif", ref[2:22, 10:34], transform=t * Affine.translation(10, 2))
    got, want = evaluate_rasters(part, ref_path).metrics, evaluate_rasters(part, crop).metrics
    assert got.total == want.total > 0 and got.overall_accuracy == want.overall_accuracy
    np.testing.assert_array_equal(got.confusion, want.confusion)
    # labels of part of the scene against a mask of all of it: compared on the labels' part
    whole = write_raster(tmp_path / "whole.tif", np.where(ref == 0, 2, ref).astype(np.uint8), transform=t)
    flipped = evaluate_rasters(whole, crop).metrics
    assert flipped.total == int((ref[2:22, 10:34] != 0).sum()) and flipped.overall_accuracy == 1.0
    r = evaluate_rasters(part, ref_path, region="4,5,6,7").metrics  # (the region: the prediction's pixels)
    assert r.total == int((ref[7:14, 14:20] != 0).sum())
    # half a pixel off, or reaching past the reference: refused as before
    for name, shift in (("half.tif", Affine.translation(10.5, 2)), ("past.tif", Affine.translation(30, 2))):
        with pytest.raises(GridMismatchError, match="grids do not match: .* is 24x20 pixels but ref.tif is 50x40"):
            evaluate_rasters(write_raster(tmp_path / name, pred, transform=t * shift), ref_path)
