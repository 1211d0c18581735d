"""python -m zoomin_jax.convert {import,export,verify}: open_clip checkpoints <-> zoomin_jax model dirs.

  import  --src PATH [--model NAME] --out DIR     open_clip .pt/.bin/.safetensors/hub folder -> model dir
  export  --src DIR --out PATH_OR_DIR             model dir or training run (WORKDIR[/STEP]: trained and
                                                  frozen weights merged) -> .safetensors/.bin, or hub folder
  verify  --flax DIR --open-clip PATH --model NAME   embedding differences; exit 1 above tolerance
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from zoomin_jax.errors import UserError

VERIFY_TEXTS = (
    "Axial CT of the chest shows a spiculated nodule in the right upper lobe (arrow).",
    "H&E staining of liver tissue, 40x; arrowheads mark apoptotic nuclei.",
    "Western blot of p53 and GAPDH in treated and control cells.",
    "Kaplan-Meier survival curves for high and low expression groups.",
    "T2-weighted MRI of the brain with a hyperintense lesion in the left temporal lobe.",
    "Confocal image of neurons stained for MAP2 (green) and DAPI (blue); scale bar 20 um.",
    "Bar chart of relative mRNA expression; * p < 0.05, ** p < 0.01.",
    "Fundus photograph showing microaneurysms and hard exudates.",
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _verify_images(paths: list[str]):
    from PIL import Image
    if paths:
        return [Image.open(p) for p in paths]
    import numpy as np
    rng = np.random.default_rng(0)
    images = []
    for height, width in ((224, 224), (300, 200), (180, 420), (512, 512)):
        y, x = np.mgrid[:height, :width]
        base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
        images.append(Image.fromarray((base + rng.normal(0, 25, base.shape)).clip(0, 255).astype(np.uint8)))
    return images


def cmd_import(args) -> None:
    from zoomin_jax import model_dir
    from zoomin_jax.convert import open_clip_source

    start = time.perf_counter()
    _log(f"reading {args.src}")
    model = open_clip_source.read(args.src, args.model, progress=True)
    _log(f"writing {args.out}")
    model_dir.save(args.out, model.cfg, model.params, model.preprocess_cfg, preset=args.model)
    _log(f"import done in {time.perf_counter() - start:.1f}s")


def cmd_export(args) -> None:
    from etils import epath

    from zoomin_jax import run_dir
    from zoomin_jax.convert.formats import write_hub_folder, write_state_dict
    from zoomin_jax.convert.mapping import params_to_state_dict

    start = time.perf_counter()
    _log(f"reading {args.src}")
    model = run_dir.load(args.src)
    cfg = model.cfg
    state_dict = params_to_state_dict(model.params, cfg, progress=True)
    out = epath.Path(args.out)
    _log(f"writing {out}")
    if out.suffix:
        write_state_dict(state_dict, out)
    else:
        write_hub_folder(state_dict, dict(cfg.open_clip_cfg), model.preprocess_cfg, out)
    _log(f"export done in {time.perf_counter() - start:.1f}s")


def cmd_verify(args) -> int:
    import jax

    import zoomin_jax
    from zoomin_jax.convert import reference
    from zoomin_jax.models.config import get_preset

    cfg = get_preset(args.model)
    clip = zoomin_jax.load_clip(args.flax)
    if clip.config != cfg:
        raise UserError(f"{args.flax} holds another architecture than --model {args.model}; "
                        f"pass the preset it was imported with.")
    texts = Path(args.texts).read_text().splitlines() if args.texts else list(VERIFY_TEXTS)
    images = _verify_images(args.images)
    tokens = zoomin_jax.tokenize(texts, context_length=cfg.text.context_length)
    _log(f"open_clip {args.model} from {args.open_clip}")
    torch_model = reference.build_open_clip(cfg, args.open_clip)
    ref_image, ref_text = reference.encode(torch_model, images, tokens,
                                           reference.eval_transform(clip.preprocess_cfg))
    del torch_model
    with jax.default_matmul_precision("float32"):
        image = clip.encode_image([clip.preprocess(im) for im in images])
        text = clip.encode_text(tokens)
    failed = False
    for name, ours, ref in (("image", image, ref_image), ("text", text, ref_text)):
        max_abs, min_cos = reference.differences(ours, ref)
        ok = max_abs <= args.atol and min_cos >= args.min_cos
        failed |= not ok
        print(f"{name}: n={len(ref)} max_abs_diff={max_abs:.3e} min_cosine={min_cos:.8f} "
              f"{'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoomin_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="open_clip checkpoint -> zoomin_jax model directory")
    p.add_argument("--src", required=True, help=".pt/.bin/.safetensors file or open_clip hub folder")
    p.add_argument("--model", help="preset name, e.g. ViT-L-14 (optional for hub folders)")
    p.add_argument("--out", required=True, help="model directory to write (local or gs://)")
    p = sub.add_parser("export", help="zoomin_jax model directory or training run -> open_clip weights")
    p.add_argument("--src", required=True, help="model directory or training run WORKDIR[/STEP] (local or gs://)")
    p.add_argument("--out", required=True, help="FILE.safetensors, FILE.bin, or a folder for a hub folder (local or gs://)")
    p = sub.add_parser("verify", help="compare embeddings with open_clip")
    p.add_argument("--flax", required=True, type=Path, help="model directory or training run WORKDIR[/STEP]")
    p.add_argument("--open-clip", required=True, help="open_clip weights file or hub folder")
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="*", default=[], help="image files (default: a fixed synthetic set)")
    p.add_argument("--texts", help="text file, one caption per line (default: a fixed set)")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--min-cos", type=float, default=0.99999)
    args = parser.parse_args(argv)
    try:
        result = {"import": cmd_import, "export": cmd_export, "verify": cmd_verify}[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return result or 0


if __name__ == "__main__":
    sys.exit(main())
