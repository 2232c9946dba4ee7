"""geoseg evaluate: confusion matrix and metrics against hand computations, grid checks, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

from geoseg.errors import GridMismatchError
from geoseg.evaluate import evaluate_rasters
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


def test_mismatched_grids_are_refused_with_the_reason(tmp_path: Path) -> None:
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    shifted = write_raster(tmp_path / "s.tif", PRED, crs=NC_LCC, transform=from_origin(500010.0, 4800000.0, 10, 10))
    with pytest.raises(GridMismatchError, match="geotransforms"):
        evaluate_rasters(shifted, ref)
    small = write_raster(tmp_path / "small.tif", PRED[:2], crs=NC_LCC)
    with pytest.raises(GridMismatchError, match="4x2 pixels but ref.tif is 4x3"):
        evaluate_rasters(small, ref)
    other_crs = write_raster(tmp_path / "crs.tif", PRED)
    with pytest.raises(GridMismatchError, match="CRS"):
        evaluate_rasters(other_crs, ref)


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
    small = write_raster(tmp_path / "small.tif", PRED[:2], crs=NC_LCC)
    r = runner.invoke(cli, ["evaluate", str(small), "--reference", str(ref)])
    assert r.exit_code == 1 and "grids do not match" in r.output
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--region", "1,2"])
    assert r.exit_code == 1 and "col_off,row_off,width,height" in r.output
    r = runner.invoke(cli, ["evaluate", str(pred), "--reference", str(ref), "--miou-classes", "1,9"])
    assert r.exit_code == 1 and "classes [9] to average over" in r.output and "unexpected" not in r.output


def test_record_in_card(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    from geoseg.card import ModelCard, default_card

    card = default_card("unet", 3, 2).save(tmp_path / "m.yaml")
    ref = write_raster(tmp_path / "ref.tif", REF, crs=NC_LCC, nodata=0)
    pred = write_raster(tmp_path / "pred.tif", PRED, crs=NC_LCC, nodata=255)
    r = runner.invoke(cli, ["-q", "evaluate", str(pred), "--reference", str(ref), "--region", "0,0,4,3",
                            "--miou-classes", "1,2", "--record-card", str(card)])
    assert r.exit_code == 0, r.output
    test = ModelCard.load(card).metrics["test"]
    assert test["miou_classes"] == [1, 2] and test["overall_accuracy"] == pytest.approx(7 / 9, abs=1e-4)
    assert test["per_class_iou"]["1"] == pytest.approx(4 / 6, abs=1e-4) and test["region"] == [0, 0, 4, 3]
