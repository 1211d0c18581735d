import subprocess
import sys

from conftest import REPO


def test_package_imports_without_jax_or_torch():
    # annotate imports the record schema; neither it nor the package may pull in a framework.
    code = ("import sys, zoomin_jax, zoomin_jax.records; "
            "heavy = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(zoomin_jax.tokenize)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_public_api_resolves_lazily():
    import zoomin_jax
    from zoomin_jax.encoder import load_clip
    from zoomin_jax.image_transform import preprocess
    assert zoomin_jax.load_clip is load_clip
    assert zoomin_jax.preprocess is preprocess
    assert "ViT-L-14" in zoomin_jax.PRESETS
