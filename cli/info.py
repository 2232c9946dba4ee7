"""``geoseg info``: what predict will see for a scene."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geoseg_cli.options import input_arg


@click.command(short_help="Show what predict will see for a scene.")
@input_arg
@click.option("--tile-size", type=int, default=512, show_default=True, help="Window size in pixels.")
@click.option("--overlap", type=int, default=128, show_default=True, help="Window overlap in pixels.")
@click.option("--classes", "num_classes", type=int, default=7, show_default=True, help="Model classes (for the memory estimate).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Windows per model call (for the memory estimate).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(input: Path, tile_size: int, overlap: int, num_classes: int, batch_size: int, as_json: bool) -> None:
    """Print size, bands, dtype, CRS, nodata, window count and a memory estimate for INPUT.

    \b
    Example:
      geoseg info sample_data/nc_landsat7_6band.tif
    """
    from geoseg.engine import describe_scene

    d = describe_scene(input, tile_size, overlap, num_classes, batch_size)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    rows = [
        ("file", d["path"]),
        ("size", f"{d['width']} x {d['height']} px ({d['megapixels']} Mpx)"),
        ("bands", f"{d['bands']} ({', '.join(n or f'band {i + 1}' for i, n in enumerate(d['band_descriptions']))})"),
        ("dtype", d["dtype"]),
        ("crs", d["crs"] or "none (outputs keep the pixel grid, not georeferenced)"),
        ("pixel size", f"{d['pixel_size'][0]:g} x {d['pixel_size'][1]:g}"),
        ("nodata", d["nodata"]),
        ("windows", f"{d['windows']} ({d['window_grid'][0]} rows x {d['window_grid'][1]} cols of {d['tile_size']} px, overlap {d['overlap']})"),
        ("memory", f"about {d['memory_estimate_mb']} MB peak for predict on CPU"),
    ]
    for k, v in rows:
        click.echo(f"{k:>10}: {v}")
