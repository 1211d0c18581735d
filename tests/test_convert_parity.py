"""open_clip -> (CLI) -> Flax parity, and Flax -> (CLI) -> open_clip bit-exact round trips."""
import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import zoomin_jax
from conftest import real_images, roco_captions, run_cli
from zoomin_jax.convert import reference
from zoomin_jax.convert.__main__ import main as convert_main
from zoomin_jax.convert.reference import save_bmc_shaped_checkpoint

ATOL, MIN_COS = 1e-4, 0.99999


@pytest.fixture(scope="module")
def inputs():
    images = real_images()
    assert len(images) >= 8
    captions = roco_captions()[:64]
    return images, captions, zoomin_jax.tokenize(captions)


# (preset, export file suffix): one case per activation — QuickGELU on the tiny preset (an activation
# and a file form are the same code at any width; ViT-B-16-quickgelu here cost 60-120 s), exact GELU
# on ViT-L-14, the product's model at its real size — and each export file form once.
CASES = [("test-tiny-quickgelu", ".bin"), ("ViT-L-14", ".safetensors")]


@pytest.fixture(scope="module")
def open_clip_knows_the_tiny_presets(tmp_path_factory):
    """open_clip's model configs with the tiny presets added (as a user's own config JSON would be), so
    that open_clip builds and loads them by name like its own."""
    directory = tmp_path_factory.mktemp("open_clip_configs")
    for preset in (preset for preset, _ in CASES if preset not in open_clip.list_models()):
        (directory / f"{preset}.json").write_text(json.dumps(zoomin_jax.get_preset(preset).open_clip_cfg))
    open_clip.add_model_config(directory)


@pytest.mark.slow
@pytest.mark.parametrize("preset,suffix", CASES)
def test_open_clip_to_flax_to_open_clip(tmp_path, inputs, preset, suffix, open_clip_knows_the_tiny_presets):
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
    ours_image = np.asarray(clip.encode_image(np.stack([clip.preprocess(im) for im in images])))
    ours_text = np.asarray(clip.encode_text(tokens))
    ref_image, ref_text = reference.encode(model, images, tokens,
                                           open_clip.image_transform(model.visual.image_size, is_train=False))
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


def test_verify_cli_reports_differences(tmp_path, capsys):
    """The command line's own main() in this process: its report and exit status are what is tested
    here (the test above starts the real commands), without three more starts of torch and jax."""
    torch.manual_seed(1)
    model = open_clip.CLIP(**zoomin_jax.get_preset("test-tiny").open_clip_cfg)
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    assert convert_main(["import", "--src", str(tmp_path / "tiny.bin"), "--model", "test-tiny",
                         "--out", str(tmp_path / "flax")]) == 0
    (tmp_path / "captions.txt").write_text("\n".join(roco_captions()[:16]))
    capsys.readouterr()
    assert convert_main(["verify", "--flax", str(tmp_path / "flax"), "--open-clip", str(tmp_path / "tiny.bin"),
                         "--model", "test-tiny", "--texts", str(tmp_path / "captions.txt")]) == 0
    ok = capsys.readouterr().out
    assert "image: n=4" in ok and "text: n=16" in ok and "FAIL" not in ok

    torch.manual_seed(2)  # other weights: verify must fail
    torch.save(open_clip.CLIP(**zoomin_jax.get_preset("test-tiny").open_clip_cfg).state_dict(), tmp_path / "other.bin")
    assert convert_main(["verify", "--flax", str(tmp_path / "flax"), "--open-clip", str(tmp_path / "other.bin"),
                         "--model", "test-tiny"]) == 1
    assert "FAIL" in capsys.readouterr().out
