"""The package as a library: it installs from its pyproject, and importing it (or reading a config)
registers no command-line flag, starts no backend and pulls in no training CLI or framework."""
import os
import subprocess
import sys
import textwrap

from conftest import REPO


def run_python(code: str, cwd=REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_package_imports_without_jax_or_torch():
    # annotate imports the record schema; neither it nor the package may pull in a framework.
    run_python("""
        import sys, zoomin_jax, zoomin_jax.records
        heavy = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]
        assert not heavy, heavy
        assert callable(zoomin_jax.tokenize)
    """)


def test_public_api_resolves_lazily():
    import zoomin_jax
    from zoomin_jax.encoder import load_clip
    from zoomin_jax.image_transform import preprocess
    assert zoomin_jax.load_clip is load_clip
    assert zoomin_jax.preprocess is preprocess
    assert "ViT-L-14" in zoomin_jax.PRESETS


def test_the_wheel_installs_into_a_fresh_venv(tmp_path):
    """What `pip install .` would install, built offline from pyproject.toml and installed without
    dependencies into an empty venv: both packages and the tokenizer's merges file are in it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("zoomin_jax-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    result = subprocess.run([python, "-c", "import zoomin_jax, annotate, pathlib; "
                             "print(pathlib.Path(zoomin_jax.__file__).parent / 'assets' / 'bpe_simple_vocab_16e6.txt.gz')"],
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    merges = result.stdout.strip()
    assert str(tmp_path / "venv") in merges and os.path.getsize(merges) > 1_000_000


def test_library_modules_register_no_flags_start_no_backend_and_import_no_training_cli():
    """A user's program with its own --config / --workdir flags imports what reads a run (export,
    load_clip, evaluation) and every other library module, then parses its own flags."""
    run_python("""
        import importlib, pkgutil, sys
        from absl import flags
        flags.DEFINE_string("config", None, "the user's own")
        flags.DEFINE_string("workdir", None, "the user's own")

        import zoomin_jax, zoomin_jax.run_dir, zoomin_jax.encoder, zoomin_jax.convert, zoomin_jax.evaluators
        import zoomin_jax.convert.__main__, zoomin_jax.model_dir, zoomin_jax.checkpoint
        assert "zoomin_jax.train" not in sys.modules, "reading a run imported the training CLI"

        for module in pkgutil.walk_packages(zoomin_jax.__path__, "zoomin_jax."):
            importlib.import_module(module.name)
        ours = [name for name in flags.FLAGS.flags_by_module_dict()
                if name.split(".")[0] in ("zoomin_jax", "configs", "annotate")]
        assert not ours, ours
        flags.FLAGS(["program", "--config=mine", "--workdir=/tmp/w"])
        assert flags.FLAGS.config == "mine"

        from jax._src import xla_bridge
        assert not xla_bridge.backends_are_initialized(), "an import started a jax backend"
    """)


def test_loading_a_config_imports_no_framework():
    run_python("""
        import importlib.util, sys
        for name in ("demo_cpu", "zoomin_vitl14"):
            spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            assert module.get_config("variant=joint").cycle == (("joint", 1),)
        heavy = [m for m in ("jax", "optax", "flax", "orbax", "grain", "torch") if m in sys.modules]
        assert not heavy, heavy
    """)
