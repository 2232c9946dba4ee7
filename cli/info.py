"""``geoseg info``: what predict will see for a scene."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geoseg_cli import options as o


def _classes(ctx: click.Context, param: click.Parameter, value: str | None) -> int | str | None:
    """A whole number: the count for the memory estimate; anything else: class names (predict's --classes)."""
    if value is not None and value.strip().lstrip("+-").isdigit():  # (-3 was taken for class names)
        return o._positive(ctx, param, int(value))
    return value


def _n(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless one."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


@click.command(short_help="Show what predict will see for a scene.")
@o.input_arg
@o.model_opt
@o.weights_opt
@o.card_opt
@o.bands_opt
@click.option("--no-model", is_flag=True, help="Describe the scene alone (512-px windows, overlap 128, 7 classes).")
@click.option("--tile-size", type=int, default=None, callback=o._tile_size, help="Window size in pixels (default: the model's).")
@click.option("--overlap", type=click.IntRange(min=0), default=None, help="Window overlap in pixels (default: the model's).")
@click.option("--classes", "num_classes", default=None, metavar="N|NAMES|FILE", callback=_classes,
              help="Model classes, for the memory estimate (default: the model's); or, as predict's --classes, the "
                   "class names of an exported model folder whose deploy.yaml has none.")
@click.option("--batch-size", type=int, default=None, callback=o._positive,
              help="Windows per model call, for the memory estimate (default: predict's on CPU).")
@click.option("--aoi", default=None, metavar="FILE|BOX",
              help="As predict's --aoi: say which part of the scene predict would write and how many windows it runs.")
@click.option("--time", "timed", is_flag=True,
              help="Also run the model on a few of the scene's windows here and say how long predict's model "
                   "time will be (a few seconds more).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(input: Path, model: str | None, weights: Path | None, card: Path | None, bands: tuple[int, ...] | None,
         no_model: bool, tile_size: int | None, overlap: int | None, num_classes: int | str | None,
         batch_size: int | None, aoi: str | None, timed: bool, as_json: bool) -> None:
    """Print size, bands, dtype, CRS, nodata, window grid and a memory estimate for INPUT, and
    whether the model predict would run (the shipped deeplabv3p unless --model/--weights say
    otherwise) can read it: which bands it takes, or why it cannot.

    \b
    Examples:
      geoseg info sample_data/nc_landsat7/image_6band_uint8.tif
      geoseg info scene.tif --model unet --bands 2,3,4,8,11 --json
    """
    from geoseg.engine import describe_scene, resolve_model

    given = [o for o, v in (("--model", model), ("--weights", weights), ("--card", card), ("--bands", bands),
                            ("--classes NAMES", isinstance(num_classes, str))) if v]
    if no_model and (given or timed):  # (they were ignored without a word)
        raise click.UsageError(f"--no-model describes the scene alone: drop {', '.join(given or ['--time'])} or "
                               "--no-model")
    o.check_window(tile_size, overlap)
    names = num_classes if isinstance(num_classes, str) else None
    if names is not None:
        num_classes = None
    source = None if no_model else resolve_model(model, weights, card, names)
    d = describe_scene(input, tile_size, overlap, num_classes, batch_size, source=source, bands=bands, aoi=aoi,
                       timed=timed)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    rows = [
        ("file", d["path"]),
        ("size", f"{d['width']} x {d['height']} px ({d['megapixels']} Mpx)"),
        ("bands", f"{d['bands']} ({', '.join(n or f'band {i + 1}' for i, n in enumerate(d['band_descriptions']))})"),
        ("dtype", d["dtype"]),
        ("crs", d["crs"] or (f"none; georeferenced by {d['georeferenced_by']} (outputs carry them, no polygons)"
                             if d.get("georeferenced_by") else "none (outputs keep the pixel grid, not georeferenced)")),
        ("pixel size", "unknown (no geotransform)" if d["pixel_size"] is None else
                       f"{'about ' if d['crs'] is None and d.get('georeferenced_by') else ''}"
                       f"{d['pixel_size'][0]:g} x {d['pixel_size'][1]:g}"
                       + ((" (fitted to the ground control points)" if d.get("georeferenced_by") else
                           " (in the geotransform's units: no CRS)") if d["crs"] is None else "")
                       + (f" (about {d['ground_pixel_m']:.3g} m on the ground)" if d["ground_pixel_m"] else "")),
        ("nodata", d["nodata"]),
    ]
    m = d["model"]
    if m is not None:
        if m["problem"]:
            rows.append(("model", f"{m['name']} cannot run on it: {m['problem']}"))
        else:
            reads = ", ".join(f"{b}->{n}" for b, n in zip(m["scene_bands"], m["bands"]))
            rows.append(("model", f"{m['name']} reads bands {reads}"))
            if m["input_z"]:
                from geoseg.engine import INPUT_RANGE_Z

                z = m["input_z"]
                off = {k: v for k, v in z.items() if abs(v) > INPUT_RANGE_Z}
                if not off:
                    worst = max(abs(v) for v in z.values())
                    rows.append(("values", f"bands average within {worst:.1f} standard deviations of its training data"))
                else:
                    rows.append(("values", f"{len(off)} of {len(z)} bands average more than {INPUT_RANGE_Z:g} standard "
                                           f"deviations from its training data ({', '.join(f'{k} {v:+.0f}' for k, v in off.items())}): "
                                           "not on the scale it learned, its map may be meaningless"))
        if m["pixel_size"] and d["ground_pixel_m"]:
            verdict = ": resample the scene, its map may be poor" if m["resolution_mismatch"] else ""
            rows.append(("resolution", f"the model learned from {m['pixel_size']:.3g} m pixels{verdict}"))
    rows += [
        ("windows", f"{d['windows']} ({_n(d['window_grid'][0], 'row')} x {_n(d['window_grid'][1], 'col')} of {d['tile_size']} px, "
                    f"overlap {d['overlap']}"
                    + ("" if d["model_input"] == [d["tile_size"]] * 2
                       else f"; padded to {d['model_input'][1]}x{d['model_input'][0]} px for the model") + ")"),
        ("memory", f"about {d['memory_estimate_mb']} MB peak for predict on CPU (batch {d['batch_size']})"),
    ]
    if d["aoi"] is not None:
        a = d["aoi"]
        c, r, w, h = a["window"]
        rows.insert(-1, ("aoi", f"{a['source']}: {w} x {h} px at column {c}, row {r} ({a['megapixels']} Mpx); "
                                f"predict runs {a['windows']} of the {d['windows']} windows"))
    if timed:
        t = d["time"]
        if t is None:
            rows.append(("time", "not measured: " + ("the model cannot read the scene" if m is None or m["problem"]
                                                     else "no window near the scene's centre holds data")))
        else:
            rows.append(("time", f"about {_duration(t['model_seconds'])} of model time for its {t['windows']} windows "
                                 f"({t['seconds_per_window']:.3g} s a window on {t['device']}, timed on "
                                 f"{t['windows_timed']} here; a run adds a few seconds to start and 10-40 % for reading, blending and writing; windows "
                                 "without data take next to none)"))
    for k, v in rows:
        click.echo(f"{k:>10}: {v}")


def _duration(seconds: float) -> str:
    """``47 s``, ``3 min 10 s``, ``2 h 05 min``."""
    s = round(seconds)
    if s < 60:
        return f"{max(seconds, 0.1):.2g} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
