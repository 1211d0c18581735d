"""Bad input to `convert import`: one clear sentence, exit 1, no traceback, nothing half-written."""
import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import zoomin_jax
from conftest import run_cli


def tiny_state_dict(preset="test-tiny", seed=0):
    torch.manual_seed(seed)
    return open_clip.CLIP(**zoomin_jax.get_preset(preset).open_clip_cfg).state_dict()


def import_fails(tmp_path, src, model="test-tiny"):
    args = ["-m", "zoomin_jax.convert", "import", "--src", str(src), "--out", str(tmp_path / "out")]
    result = run_cli(*args, *(["--model", model] if model else []), check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    assert not (tmp_path / "out").exists()
    return error_lines[0]


def test_weights_of_another_architecture(tmp_path):
    save_file(tiny_state_dict(), tmp_path / "tiny.safetensors")
    error = import_fails(tmp_path, tmp_path / "tiny.safetensors", model="ViT-B-16")
    assert "visual.conv1.weight has shape (64, 3, 8, 8) but ViT-B-16 expects (768, 3, 16, 16)" in error


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state_dict = tiny_state_dict()
    del state_dict["visual.proj"], state_dict["transformer.resblocks.1.ln_2.bias"]
    state_dict["visual.head.weight"] = torch.zeros(3)
    torch.save(state_dict, tmp_path / "partial.pt")
    error = import_fails(tmp_path, tmp_path / "partial.pt")
    assert "missing keys visual.proj, transformer.resblocks.1.ln_2.bias" in error
    assert "unexpected keys visual.head.weight" in error


def test_deeper_checkpoint_lists_extra_blocks(tmp_path):
    torch.save(tiny_state_dict("test-tiny-deep"), tmp_path / "deep.pt")
    error = import_fails(tmp_path, tmp_path / "deep.pt")
    assert "unexpected keys transformer.resblocks.2." in error


def test_quick_gelu_mismatch_with_hub_config(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(tiny_state_dict(), hub / "open_clip_model.safetensors")
    config = {"model_cfg": zoomin_jax.PRESETS["test-tiny"], "preprocess_cfg": {}}
    (hub / "open_clip_config.json").write_text(json.dumps(config))
    error = import_fails(tmp_path, hub, model="test-tiny-quickgelu")
    assert "open_clip_config.json says quick_gelu=False but --model test-tiny-quickgelu uses quick_gelu=True" in error
    # Without --model the hub config decides, and the import succeeds.
    run_cli("-m", "zoomin_jax.convert", "import", "--src", str(hub), "--out", str(tmp_path / "ok"))
    assert not zoomin_jax.load_clip(tmp_path / "ok").config.quick_gelu


@pytest.mark.parametrize("name", ["weights.pt", "weights.safetensors"])
def test_truncated_file(tmp_path, name):
    path = tmp_path / name
    (torch.save if name.endswith(".pt") else save_file)(tiny_state_dict(), path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    error = import_fails(tmp_path, path)
    assert f"{path} is a truncated or corrupt" in error


def test_unknown_format(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(256))
    assert f"{path} is in an unknown format" in import_fails(tmp_path, path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_carries_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    state_dict = dict(tiny_state_dict(), payload=RunsCode(marker))
    torch.save(state_dict, tmp_path / "evil.pt")
    error = import_fails(tmp_path, tmp_path / "evil.pt")
    assert "was refused: its pickle carries code" in error
    assert not marker.exists()


def test_unknown_preset(tmp_path):
    save_file(tiny_state_dict(), tmp_path / "tiny.safetensors")
    assert "Unknown model preset 'ViT-X-99'" in import_fails(tmp_path, tmp_path / "tiny.safetensors",
                                                             model="ViT-X-99")
