"""`annotate show`: a PNG per figure with panel boxes, labels, region boxes and texts, and an
index.html. Captions and texts are untrusted input: every one is HTML-escaped."""
from __future__ import annotations

import hashlib
import html
import io
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from zoomin_jax import records

_PANEL_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def safe_name(figure_id: str) -> str:
    """A file name for any id: "../x" or "PMC1/fig 2" cannot escape or collide."""
    digest = hashlib.sha1(figure_id.encode("utf-8")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', figure_id)[:80]}-{digest}.png"


def overlay(record: dict) -> Image.Image:
    image = Image.open(io.BytesIO(record["image_bytes"]))
    image.load()
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.width // 60))
    for panel in record["panels"]:
        colour = _PANEL_COLOURS[panel["panel_id"] % len(_PANEL_COLOURS)]
        draw.rectangle(panel["box"], outline=colour, width=max(2, image.width // 300))
        draw.text((panel["box"][0] + 4, panel["box"][1] + 2), panel["label"] or "?", fill=colour, font=font)
    for region in record["regions"]:
        draw.rectangle(region["box"], outline=(255, 225, 25), width=2)
        if region["marker_box"]:
            draw.rectangle(region["marker_box"], outline=(255, 255, 255), width=1)
        draw.text((region["box"][0], region["box"][3] + 2), (region["text_sub"] or region["text_lvlm"])[:40],
                  fill=(255, 225, 25), font=font)
    return image


def write_gallery(record_dir: str | Path, out: str | Path, limit: int | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted(Path(record_dir).glob("records-*.array_record"))
    rows = []
    for n, record in enumerate(records.iter_records(shards)):
        if limit is not None and n >= limit:
            break
        name = safe_name(record["figure_id"])
        overlay(record).save(out / name)
        panels = "".join(f"<li><b>{html.escape(p['label'] or '—')}</b> ({html.escape(p['kind'])}): "
                         f"{html.escape(p['text'])}</li>" for p in record["panels"])
        regions = "".join(f"<li>{html.escape(r['source'])} / {html.escape(r['marker_kind'])}: "
                          f"{html.escape(r['text_sub'] or r['text_lvlm'])}</li>" for r in record["regions"])
        warnings = "".join(f"<li>{html.escape(w)}</li>" for w in record["annotation"].get("warnings", []))
        rows.append(f"<section><h2>{html.escape(record['figure_id'])}</h2><img src=\"{html.escape(name)}\">"
                    f"<p>{html.escape(record['caption'])}</p><h3>Panels</h3><ul>{panels}</ul>"
                    f"<h3>Regions</h3><ul>{regions}</ul><h3>Warnings</h3><ul>{warnings}</ul></section>")
    page = ("<!doctype html><meta charset=\"utf-8\"><title>Panel2Patch annotations</title>"
            "<style>img{max-width:100%} section{border-bottom:1px solid #ccc}</style>" + "".join(rows))
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
