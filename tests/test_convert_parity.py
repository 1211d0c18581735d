"""open_clip -> (CLI) -> Flax parity, and Flax -> (CLI) -> open_clip bit-exact round trips."""
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import zoomin_jax
from conftest import real_images, roco_captions, run_cli
from zoomin_jax.convert import reference
from zoomin_jax.convert.reference import save_bmc_shaped_checkpoint

ATOL, MIN_COS = 1e-4, 0.99999


@pytest.fixture(scope="module")
def inputs():
    images = real_images()
    assert len(images) >= 8
    captions = roco_captions()[:64]
    return images, captions, zoomin_jax.tokenize(captions)


# (preset, export file suffix): one case per activation (QuickGELU, exact GELU: the product's
# ViT-L-14), each export file form once. A plain ViT-B-16 case added nothing ViT-L-14 does not check
# and 90 s of CI.
CASES = [("ViT-B-16-quickgelu", ".bin"), ("ViT-L-14", ".safetensors")]


@pytest.mark.parametrize("preset,suffix", CASES)
def test_open_clip_to_flax_to_open_clip(tmp_path, inputs, preset, suffix):
    images, captions, tokens = inputs
    torch.manual_seed(0)
    model = open_clip.create_model(preset, pretrained=None).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    bmc_pt = tmp_path / "BMC_CLIP_CF.pt"
    save_bmc_shaped_checkpoint(model, bmc_pt)

    run_cli("-m", "zoomin_jax.convert", "import", "--src", str(bmc_pt), "--model", preset,
            "--out", str(tmp_path / "flax"))
    # Batches of 16: the 14 images padded to the default 64 cost ViT-L-14 fifty forward passes for nothing.
    clip = zoomin_jax.load_clip(tmp_path / "flax").with_batch_size(16)
    ours_image = np.asarray(clip.encode_image(np.stack([zoomin_jax.preprocess(im) for im in images])))
    ours_text = np.asarray(clip.encode_text(tokens))
    ref_image, ref_text = reference.encode(model, images, tokens, open_clip.image_transform(224, is_train=False))
    for ours, ref in ((ours_image, ref_image), (ours_text, ref_text)):
        max_abs, min_cos = reference.differences(ours, ref)
        print(f"{preset}: max_abs={max_abs:.2e} min_cos={min_cos:.9f}")
        assert max_abs <= ATOL and min_cos >= MIN_COS
    del model

    exported_file = tmp_path / f"exported{suffix}"
    run_cli("-m", "zoomin_jax.convert", "export", "--src", str(tmp_path / "flax"), "--out", str(exported_file))
    run_cli("-m", "zoomin_jax.convert", "export", "--src", str(tmp_path / "flax"), "--out", str(tmp_path / "hub"))
    on_disk = load_file(exported_file) if suffix == ".safetensors" else torch.load(exported_file, weights_only=True)
    assert on_disk.keys() == original.keys()
    for key, value in original.items():
        assert on_disk[key].dtype == value.dtype and torch.equal(on_disk[key], value), key
    # open_clip loads both forms strictly (load_state_dict(strict=True) inside).
    loaded_file, _, _ = open_clip.create_model_and_transforms(preset, pretrained=str(exported_file))
    loaded_hub, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    for loaded in (loaded_file, loaded_hub):
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in original.items())
    assert loaded_hub.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == (
        "QuickGELU" if preset.endswith("quickgelu") else "GELU")


def test_verify_cli_reports_differences(tmp_path):
    torch.manual_seed(1)
    model = open_clip.CLIP(**zoomin_jax.get_preset("test-tiny").open_clip_cfg)
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    run_cli("-m", "zoomin_jax.convert", "import", "--src", str(tmp_path / "tiny.bin"), "--model", "test-tiny",
            "--out", str(tmp_path / "flax"))
    (tmp_path / "captions.txt").write_text("\n".join(roco_captions()[:16]))
    ok = run_cli("-m", "zoomin_jax.convert", "verify", "--flax", str(tmp_path / "flax"), "--open-clip",
                 str(tmp_path / "tiny.bin"), "--model", "test-tiny", "--texts", str(tmp_path / "captions.txt"))
    assert "image: n=4" in ok.stdout and "text: n=16" in ok.stdout and "FAIL" not in ok.stdout

    torch.manual_seed(2)  # other weights: verify must fail
    torch.save(open_clip.CLIP(**zoomin_jax.get_preset("test-tiny").open_clip_cfg).state_dict(), tmp_path / "other.bin")
    bad = run_cli("-m", "zoomin_jax.convert", "verify", "--flax", str(tmp_path / "flax"), "--open-clip",
                  str(tmp_path / "other.bin"), "--model", "test-tiny", check=False)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
