"""Prior adaptation (geoseg.priors, and predict's --adapt-prior) on known mixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geoseg.card import ModelCard
from geoseg.engine import ModelSource, PredictOptions, sample_posteriors, segment_scene
from geoseg.errors import ModelError, ParameterError
from geoseg.io import open_scene
from geoseg.priors import em_priors, reweight_probs
from geoseg.tiling import make_grid
from tests.conftest import write_raster
from tests.test_engine import identity_card


def test_em_recovers_the_mixing_proportion_of_known_components() -> None:
    # A binary feature: P(a | class 0) = 0.7, P(a | class 1) = 0.3. Under training priors 0.5 / 0.5
    # the posteriors are (0.7, 0.3) at a and (0.3, 0.7) at b. A scene that is 80 % class 0 shows
    # a in 0.8 * 0.7 + 0.2 * 0.3 = 62 % of its pixels; the maximum-likelihood mix is 0.8 / 0.2.
    post = np.array([[0.7, 0.3]] * 62 + [[0.3, 0.7]] * 38)
    est = em_priors(post, np.array([0.5, 0.5]), tol=1e-10, max_iter=10_000)
    assert est.converged and est.pixels == 100
    np.testing.assert_allclose(est.scene, [0.8, 0.2], atol=1e-4)
    np.testing.assert_allclose(est.weights, [1.6, 0.4], atol=1e-3)
    # The same scene under skewed training priors 0.25 / 0.75: posteriors are Bayes-consistent
    # with those priors; the scene's mix is still 0.8 / 0.2.
    lik = np.array([[0.7, 0.3], [0.3, 0.7]])  # rows: feature a, b; columns: classes
    prior = np.array([0.25, 0.75])
    post2 = lik * prior / (lik * prior).sum(1, keepdims=True)
    rows = np.repeat(post2, [62, 38], axis=0)
    est2 = em_priors(rows, prior, tol=1e-10, max_iter=10_000)
    np.testing.assert_allclose(est2.scene, [0.8, 0.2], atol=1e-4)
    # a pixel of NaN posteriors (an fp16 overflow) is left out: it made every weight NaN (and the
    # whole adapted mask the first class)
    est3 = em_priors(np.vstack([post, [[np.nan, np.nan]], [[np.inf, 0.0]]]), np.array([0.5, 0.5]), tol=1e-10,
                     max_iter=10_000)
    assert est3.pixels == 100 and np.isfinite(est3.weights).all()
    np.testing.assert_allclose(est3.scene, [0.8, 0.2], atol=1e-4)


def test_em_with_a_bounded_ratio_stops_at_the_bound() -> None:
    post = np.array([[0.7, 0.3]] * 62 + [[0.3, 0.7]] * 38)  # unbounded: 0.8 / 0.2 (above)
    est = em_priors(post, np.array([0.5, 0.5]), max_ratio=1.5, tol=1e-10)
    # Class 2's ratio may not fall below 1/1.5: its prior stays at 1/3, class 1's at 2/3.
    np.testing.assert_allclose(est.scene, [2 / 3, 1 / 3], atol=1e-5)
    assert est.weights.max() <= 1.5 + 1e-5 and est.weights.min() >= 1 / 1.5 - 1e-5
    # A rare class that runs away unbounded is held at twice its training prior.
    rng = np.random.default_rng(1)
    p = np.array([0.6, 0.37, 0.03])
    post3 = rng.dirichlet([3.0, 2.0, 1.0], size=400)
    free, held = em_priors(post3, p), em_priors(post3, p, max_ratio=2.0)
    assert free.scene[2] > 0.1 and held.scene[2] == pytest.approx(0.06, abs=1e-4)
    with pytest.raises(ParameterError, match="max_ratio"):
        em_priors(post3, p, max_ratio=0.5)


def test_em_changes_nothing_where_the_scene_looks_like_the_training_data() -> None:
    rng = np.random.default_rng(0)
    post = rng.dirichlet([2.0, 1.0, 0.5], size=500)
    est = em_priors(post, post.mean(axis=0))
    assert est.converged and est.iterations == 1
    np.testing.assert_allclose(est.weights, 1.0, atol=1e-5)
    empty = em_priors(np.zeros((0, 3)), np.array([0.2, 0.3, 0.5]))
    np.testing.assert_array_equal(empty.weights, 1.0)
    with pytest.raises(ParameterError, match="do not match"):
        em_priors(post, np.array([0.5, 0.5]))


def test_reweight_renormalises_and_keeps_uncovered_pixels_zero() -> None:
    probs = np.zeros((2, 2, 2), np.float32)
    probs[:, 0, 0] = [0.5, 0.5]
    probs[:, 0, 1] = [0.8, 0.2]
    out = reweight_probs(probs, np.array([1.0, 3.0]))
    np.testing.assert_allclose(out[:, 0, 0], [0.25, 0.75])
    np.testing.assert_allclose(out[:, 0, 1], [0.8 / 1.4, 0.6 / 1.4], rtol=1e-6)
    assert not out[:, 1].any()


def test_card_round_trips_class_prior_and_refuses_bad_ones() -> None:
    card = identity_card(1, 2).replace(class_prior=(0.25, 0.75), adapt_prior=True)
    back = ModelCard.from_dict(card.to_dict())
    assert back == card and back.class_prior == (0.25, 0.75) and back.adapt_prior
    assert "class_prior" not in identity_card(1, 2).to_dict()  # old cards stay as they were
    with pytest.raises(ModelError, match="one per class"):
        identity_card(1, 2).replace(class_prior=(1.0,))
    with pytest.raises(ModelError, match="no class_prior"):
        identity_card(1, 2).replace(adapt_prior=True)
    with pytest.raises(ModelError, match="true or false"):
        ModelCard.from_dict({**card.to_dict(), "adapt_prior": "yes"})
    # masks mark nodata with 255 whatever a card said (a card of nodata_id 1 got masks of 255)
    with pytest.raises(ModelError, match="nodata_id 1: geoseg's masks mark nodata with 255"):
        ModelCard.from_dict({**card.to_dict(), "nodata_id": 1})


def soft_predictor(x: np.ndarray) -> np.ndarray:
    """Two classes, P(class 1) = band 1's value (in [0, 1])."""
    p1 = np.clip(x[:, 0], 0.0, 1.0)
    return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)


def _scene(tmp_path: Path) -> Path:
    # P(class 1) is 0.4 on the left 70 % of the scene and 0.6 on the rest (a nodata corner too).
    data = np.full((1, 90, 130), 0.4, np.float32)
    data[:, :, 91:] = 0.6
    data[:, :10, :10] = np.nan
    return write_raster(tmp_path / "soft.tif", data, nodata=None)


def test_sample_posteriors_counts_each_valid_pixel_once(tmp_path: Path) -> None:
    src = _scene(tmp_path)
    meta = open_scene(src)
    card = identity_card(1, 2, tile=32, overlap=8)
    grid = make_grid(meta.height, meta.width, 32, 8)
    post = sample_posteriors(meta, (1,), grid, card, soft_predictor, max_pixels=10**9)
    valid = 90 * 130 - 100
    assert post.shape == (valid, 2)  # every valid pixel exactly once
    assert (post[:, 1] > 0.5).sum() == 90 * 39
    sub = sample_posteriors(meta, (1,), grid, card, soft_predictor, max_pixels=1000)
    assert 500 <= sub.shape[0] <= 1500
    few = sample_posteriors(meta, (1,), grid, card, soft_predictor, max_windows=3, max_pixels=10**9)
    assert 0 < few.shape[0] < valid // 4  # 3 of the 24 windows' cores


def test_the_sample_of_a_mostly_empty_scene_comes_from_its_data(tmp_path: Path) -> None:
    """A mosaic with one scene in the middle of nodata: evenly spread sample windows all missed it,
    and the scene was 'adapted' from 0 pixels (weights 1); the sample now comes from the windows
    that hold data (and from inside an AOI)."""
    from geoseg.aoi import load_aoi
    from geoseg.io import windows_with_data

    data = np.zeros((1, 64, 640), np.float32)
    data[:, :, 330:380] = 0.6  # data in window 5 of 10 only (windows of 64, no overlap)
    meta = open_scene(write_raster(tmp_path / "mosaic.tif", data, nodata=0))
    card = identity_card(1, 2, tile=64, overlap=0)
    grid = make_grid(meta.height, meta.width, 64, 0)
    assert windows_with_data(meta, [t.window for t in grid.tiles()]) == [i == 5 for i in range(10)]
    post = sample_posteriors(meta, (1,), grid, card, soft_predictor, max_windows=2, max_pixels=10**9)
    assert post.shape == (64 * 50, 2)  # every valid pixel of the one window with data (was 0)
    # an AOI over windows 1-2 only: the windows it leaves out are not candidates either
    full = np.ones((1, 64, 640), np.float32) * 0.6
    dense = open_scene(write_raster(tmp_path / "dense.tif", full, nodata=0))
    t = dense.transform
    box = f"{t.c + 70 * t.a},{t.f + 60 * t.e},{t.c + 180 * t.a},{t.f + 4 * t.e}"
    aoi = load_aoi(box, dense)
    sub = dense.subset(Window(0, 0, 640, 64), aoi)
    holds = windows_with_data(sub, [t.window for t in grid.tiles()])
    assert holds == [i in (1, 2) for i in range(10)]


def test_predict_adapts_the_posteriors_to_the_scene(tmp_path: Path) -> None:
    src = _scene(tmp_path)
    card = identity_card(1, 2, tile=32, overlap=8)
    plain = segment_scene(src, tmp_path / "plain", source=ModelSource(card), predictor=soft_predictor)
    with rasterio.open(plain.mask) as ds:
        m0 = ds.read(1)
        assert "GEOSEG_SCENE_PRIOR" not in ds.tags()
    assert plain.scene_prior is None and (m0[:, :91][m0[:, :91] != 255] == 1).all()
    # The model's posteriors reflect a training mix of 0.8 / 0.2: on this scene EM finds more of
    # class 2 than that, and the left part (P = 0.4) tips over to class 2.
    skewed = card.replace(class_prior=(0.8, 0.2))
    res = segment_scene(src, tmp_path / "adapted", source=ModelSource(skewed), predictor=soft_predictor,
                        options=PredictOptions(adapt_prior=True, prior_max_ratio=None))
    assert res.scene_prior is not None and res.scene_prior["name 2"] > 0.5
    with rasterio.open(res.mask) as ds:
        m1 = ds.read(1)
        assert "name 2=" in ds.tags()["GEOSEG_SCENE_PRIOR"]
    assert (m1[m1 != 255] == 2).all() and ((m1 == 255) == (m0 == 255)).all()
    held = segment_scene(src, tmp_path / "held", source=ModelSource(skewed), predictor=soft_predictor,
                         options=PredictOptions(adapt_prior=True, prior_max_ratio=1.2))
    assert held.scene_prior is not None and held.scene_prior["name 2"] == pytest.approx(0.24, abs=1e-3)
    default = segment_scene(src, tmp_path / "default", source=ModelSource(skewed), predictor=soft_predictor,
                            options=PredictOptions(adapt_prior=True))  # the default bound: ratio 2
    assert default.scene_prior is not None and default.scene_prior["name 2"] == pytest.approx(0.4, abs=1e-3)
    # A prior equal to the scene's own mean posterior changes nothing; the card's flag turns it on.
    mean = 0.4 * 91 / 130 + 0.6 * 39 / 130
    same = card.replace(class_prior=(1 - mean, mean), adapt_prior=True)
    res2 = segment_scene(src, tmp_path / "same", source=ModelSource(same), predictor=soft_predictor)
    assert res2.scene_prior is not None
    with rasterio.open(res2.mask) as ds:
        np.testing.assert_array_equal(ds.read(1), m0)
    # Without a class prior, --adapt-prior is refused before anything is written.
    with pytest.raises(ParameterError, match="no class_prior"):
        segment_scene(src, tmp_path / "none", source=ModelSource(card), predictor=soft_predictor,
                      options=PredictOptions(adapt_prior=True))
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_main_pass_reuses_the_prior_pass_s_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       batch_size: int) -> None:
    """Prior adaptation runs up to 64 windows first and the main pass ran them all again (a scene of 64
    windows or fewer twice: 512-px windows took twice as long). It reuses them now: every window runs
    once, the mask is the same, and the model still gets full batches."""
    import geoseg.engine

    src = _scene(tmp_path)
    rng = np.random.default_rng(3)
    with rasterio.open(src, "r+") as ds:  # varied values, so a window taken from the wrong place would show
        data = ds.read()
        data[np.isfinite(data)] = rng.uniform(0.1, 0.9, int(np.isfinite(data).sum()))
        ds.write(data)
    card = identity_card(1, 2, tile=32, overlap=8).replace(class_prior=(0.3, 0.7), adapt_prior=True)
    seen: list[int] = []

    def counting(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return soft_predictor(x)

    masks, full = {}, geoseg.engine.PRIOR_KEEP_MB
    for keep in (full, 0):
        monkeypatch.setattr(geoseg.engine, "PRIOR_KEEP_MB", keep)
        seen.clear()
        res = segment_scene(src, tmp_path / f"k{keep}", source=ModelSource(card), predictor=counting,
                            options=PredictOptions(batch_size=batch_size, prior_windows=64))
        with rasterio.open(res.mask) as ds:
            masks[keep] = ds.read(1)
        calls = list(seen)
        if keep:
            assert sum(calls) == res.windows, (sum(calls), res.windows)  # each window once
            assert max(calls) == batch_size
        else:
            assert sum(calls) > res.windows  # the sampled windows twice
    assert set(masks) == {0, full}
    np.testing.assert_array_equal(masks[0], masks[full])


def test_em_in_matrix_products_matches_the_textbook_step() -> None:
    """The E step runs as two matrix-vector products (4.5-5x faster than the (N, C) temporaries, a fifth of a
    small scene's time in batch): each iteration equals Saerens et al.'s step within rounding."""
    rng = np.random.default_rng(3)
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    post = rng.dirichlet(p * 20, size=20_000) * 0.5 + rng.dirichlet(np.ones(5), size=20_000) * 0.5
    q = p.copy()
    for _ in range(40):  # the textbook step, as many times
        adj = post * (q / p)
        adj /= adj.sum(axis=1, keepdims=True)
        q = np.maximum(adj.mean(axis=0), 1e-6)
        q /= q.sum()
    est = em_priors(post, p, max_ratio=None, tol=0.0, max_iter=40)
    assert est.iterations == 40
    np.testing.assert_allclose(est.scene, q, rtol=1e-5)


def test_a_small_scene_is_read_once_when_the_prior_pass_kept_its_windows(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With prior adaptation the sample pass runs every window of a small scene and keeps its probabilities;
    the main pass read and normalised each window again only for its valid mask (13 % of a small scene's
    time in batch). It now takes both from the sample pass: one read, the same mask."""
    import geoseg.engine as ge

    src = _scene(tmp_path)
    card = identity_card(1, 2, tile=32, overlap=8).replace(class_prior=(0.8, 0.2))
    opts = PredictOptions(adapt_prior=True, prior_max_ratio=None)
    want = segment_scene(src, tmp_path / "a", source=ModelSource(card), predictor=soft_predictor, options=opts)
    reads = []
    real = ge._prepare_window

    def counted(meta, tile, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(tile.index)
        return real(meta, tile, *args, **kwargs)

    monkeypatch.setattr(ge, "_prepare_window", counted)
    got = segment_scene(src, tmp_path / "b", source=ModelSource(card), predictor=soft_predictor, options=opts)
    assert sorted(reads) == sorted(set(reads)) and reads, reads  # each window once
    with rasterio.open(want.mask) as a, rasterio.open(got.mask) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_a_card_keeps_non_ascii_class_names_readable(tmp_path: Path) -> None:
    """Cards (and deploy.yaml) were written with YAML's escapes: a user editing one read `name: "For\\xEAt"` and
    `"\\u6C34\\u57DF"`. Written as UTF-8 text now, and read back the same under any locale."""
    import dataclasses

    from geoseg.card import ClassInfo

    card = identity_card(1, 2)
    card = card.replace(classes=tuple(dataclasses.replace(c, name=n) for c, n in zip(card.classes, ("Forêt", "水域"))))
    path = card.save(tmp_path / "c.yaml")
    text = path.read_text(encoding="utf-8")
    assert "Forêt" in text and "水域" in text and "\\x" not in text and "\\u" not in text
    assert ModelCard.load(path) == card and isinstance(card.classes[0], ClassInfo)
