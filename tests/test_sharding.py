"""Meshes from config (one slice and multi-slice), the jax.distributed decision per environment, the
platform check, command-line overrides of optional config fields, and a model directory restored
straight into mesh shardings, on one process (8 fake CPU devices) and on two."""
import dataclasses
import os

import jax
import numpy as np
import pytest
from absl import flags
from flax import traverse_util
from jax._src.clusters import cloud_tpu_cluster
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from ml_collections import ConfigDict, config_flags

from conftest import REPO, two_processes
from zoomin_jax import model_dir, sharding
from zoomin_jax.errors import UserError
from zoomin_jax.models.config import get_preset

RULES = (("visual/.*", "fsdp"), ("token_embedding/.*", "fsdp"), (".*", "replicate"))


def device_ids(mesh):
    return [device.id for device in mesh.devices.flat]


@pytest.fixture(autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "run the tests with XLA_FLAGS=--xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("axes,shape", [
    ((("data", -1),), {"data": 8}),
    ((("data", -1), ("fsdp", 1)), {"data": 8, "fsdp": 1}),
    ((("data", 4), ("fsdp", 2)), {"data": 4, "fsdp": 2}),
    ((("data", 2), ("fsdp", -1)), {"data": 2, "fsdp": 4}),
    ((("replica", 2), ("data", -1), ("fsdp", 2)), {"replica": 2, "data": 2, "fsdp": 2}),
])
def test_mesh_layouts_use_every_device_once(axes, shape):
    mesh = sharding.make_mesh(axes)
    assert dict(mesh.shape) == shape and mesh.axis_names == tuple(shape)
    assert sorted(device_ids(mesh)) == list(range(8))
    assert mesh.axis_types == (AxisType.Auto,) * len(axes)  # classic NamedSharding, not explicit sharding


def test_mesh_over_some_devices():
    mesh = sharding.make_mesh((("data", -1),), devices=jax.devices()[2:4])
    assert dict(mesh.shape) == {"data": 2} and device_ids(mesh) == [2, 3]


@pytest.mark.parametrize("axes,message", [
    ((("data", -1), ("fsdp", -1)), "only one may be -1"),
    ((("data", 0),), "sizes must be positive"),
    ((("data", 4),), r"config.mesh \(\('data', 4\),\) makes 4 devices, but there are 8"),
    ((("data", -1), ("fsdp", 3)), "makes 6 devices, but there are 8"),
    ((("data", 16),), "makes 16 devices, but there are 8"),
])
def test_mesh_errors_name_the_key(axes, message):
    with pytest.raises(UserError, match=message):
        sharding.make_mesh(axes)


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """What create_hybrid_device_mesh reads of a device (CPU-like layout within a slice)."""
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def slices(count: int, per_slice: int) -> list[FakeTpu]:
    return [FakeTpu(i, i // per_slice, process_index=i // per_slice) for i in range(count * per_slice)]


def test_multi_slice_data_axis_spans_the_slices():
    devices = slices(2, 4)
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)), devices, dcn_axes=(("data", -1),))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert sorted(device_ids(mesh)) == list(range(8))
    # The first half of the data axis is slice 0, the second slice 1: fsdp stays inside a slice.
    assert [[device.slice_index for device in row] for row in mesh.devices] == [[0, 0], [0, 0], [1, 1], [1, 1]]


def test_multi_slice_over_two_axes():
    mesh = sharding.make_mesh((("data", 1), ("fsdp", -1)), slices(4, 2), dcn_axes=(("data", 2), ("fsdp", -1)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert sorted(device_ids(mesh)) == list(range(8))
    assert [[device.slice_index for device in row] for row in mesh.devices] == [[0, 0, 1, 1], [2, 2, 3, 3]]


@pytest.mark.parametrize("dcn_axes,message", [
    ((), r"form 2 TPU slices; set config.dcn_mesh"),
    ((("data", 4),), r"config.dcn_mesh \(\('data', 4\),\) makes 4 slices, but there are 2"),
    ((("model", -1),), r"config.dcn_mesh names \['model'\], which config.mesh \('data', 'fsdp'\) lacks"),
])
def test_multi_slice_errors(dcn_axes, message):
    with pytest.raises(UserError, match=message):
        sharding.make_mesh((("data", -1), ("fsdp", 2)), slices(2, 4), dcn_axes=dcn_axes)


def test_one_slice_takes_a_dcn_axis_of_one():
    mesh = sharding.make_mesh((("data", -1),), dcn_axes=(("data", -1),))
    assert dict(mesh.shape) == {"data": 8}


def config_from_flags(*args: str) -> ConfigDict:
    """A config file read and overridden as `python -m zoomin_jax.train` reads it."""
    argv = ["train", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_config_meshes():
    paper = config_from_flags(f"--config={REPO / 'configs' / 'zoomin_vitl14.py'}")
    assert dict(sharding.config_mesh(paper).shape) == {"data": 8, "fsdp": 1}
    demo = config_from_flags(f"--config={REPO / 'configs' / 'demo_cpu.py'}")
    assert dict(sharding.config_mesh(demo).shape) == {"data": 8}
    split = config_from_flags(f"--config={REPO / 'configs' / 'zoomin_vitl14.py'}",
                              "--config.mesh=(('data', 2), ('fsdp', -1))", "--config.dcn_mesh=(('data', -1),)")
    assert dict(sharding.config_mesh(split).shape) == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("config_arg", ["demo_cpu.py", "zoomin_vitl14.py", "zoomin_vitl14.py:init=/from/arg"])
def test_model_init_can_be_set_from_the_command_line(config_arg):
    config = config_from_flags(f"--config={REPO / 'configs' / config_arg}", "--config.model_init=/x")
    assert config.model_init == "/x"
    assert config_from_flags(f"--config={REPO / 'configs' / config_arg}").model_init in (None, "/from/arg")


@pytest.fixture
def cluster_env(monkeypatch):
    """No cluster variables, and a fake GCE metadata server (dict: key -> value) instead of the network."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "ZOOMIN_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
    metadata = {}
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                        lambda key: (metadata[key], 200) if key in metadata else ("", 404))
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return monkeypatch, metadata, calls


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16",
             "SLURM_JOB_NUM_NODES": "2"}
SLURM_STEP = SLURM_JOB | {"SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_PROCID": "9",
                          "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("env,expected", [
    ({}, []),                                                     # a laptop
    (SLURM_JOB, []),                                              # a bare salloc shell: no step, no coordinator
    (SLURM_STEP, [{}]),                                           # srun: JAX reads SLURM's variables itself
    (SLURM_STEP | {"SLURM_NTASKS": "1"}, []),                     # a one-task step: one process
    (SLURM_STEP | {"ZOOMIN_HEARTBEAT_TIMEOUT_S": "20"}, [{"heartbeat_timeout_seconds": 20}]),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2"}, [{}]),
    ({"ZOOMIN_CLUSTER": "auto"}, [{}]),
    ({"ZOOMIN_COORDINATOR": "127.0.0.1:1234", "ZOOMIN_NUM_PROCESSES": "8", "ZOOMIN_PROCESS_ID": "3",
      "ZOOMIN_LOCAL_DEVICE_IDS": "3"},
     [{"coordinator_address": "127.0.0.1:1234", "num_processes": 8, "process_id": 3, "local_device_ids": [3]}]),
    ({"ZOOMIN_COORDINATOR": "127.0.0.1:1234", "ZOOMIN_NUM_PROCESSES": "2", "ZOOMIN_PROCESS_ID": "1"},
     [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1, "local_device_ids": None}]),
    ({"ZOOMIN_COORDINATOR": "127.0.0.1:1234", "ZOOMIN_NUM_PROCESSES": "1", "ZOOMIN_PROCESS_ID": "0"}, []),
], ids=["laptop", "salloc-shell", "srun-step", "srun-one-task", "heartbeat", "mpirun", "auto", "zoomin-one-gpu",
        "zoomin-cpu", "zoomin-one-process"])
def test_distributed_start_per_environment(cluster_env, env, expected):
    monkeypatch, _, calls = cluster_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sharding.initialize_distributed()
    assert calls == expected


def test_half_the_zoomin_variables_is_an_error(cluster_env):
    monkeypatch, _, calls = cluster_env
    monkeypatch.setenv("ZOOMIN_NUM_PROCESSES", "2")
    with pytest.raises(UserError, match="ZOOMIN_NUM_PROCESSES set without ZOOMIN_COORDINATOR, ZOOMIN_PROCESS_ID"):
        sharding.initialize_distributed()
    assert calls == []


@pytest.mark.parametrize("workers,expected", [("w0,w1,w2,w3", [{}]), ("w0", [])])
def test_cloud_tpu_vm_found_through_its_metadata_server(cluster_env, workers, expected):
    """What JAX itself checks on a TPU VM (its cloud_tpu_init flag, then the metadata server): a pod
    slice starts jax.distributed, a one-host slice does not need it."""
    monkeypatch, metadata, calls = cluster_env
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    metadata.update({"agent-worker-number": "2", "worker-network-endpoints": workers, "tpu-env": ""})
    sharding.initialize_distributed()
    assert calls == expected


def test_gke_tpu_pod_found_through_its_variables(cluster_env):
    monkeypatch, _, calls = cluster_env
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # GKE: no GCE metadata to ask
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
    sharding.initialize_distributed()
    assert calls == [{}]


@pytest.mark.parametrize("platform,backend,allowed", [
    ("accelerator", "cpu", False), ("gpu", "cpu", False), ("tpu", "cpu", False), ("any", "cpu", True),
    (None, "cpu", True), ("accelerator", "gpu", True), ("accelerator", "tpu", True), ("gpu", "gpu", True),
    ("tpu", "gpu", False),
])
def test_platform_check(monkeypatch, platform, backend, allowed):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    config = ConfigDict({"platform": platform})
    if allowed:
        sharding.require_platform(config)
    else:
        with pytest.raises(UserError, match=f"config.platform='{platform}', but JAX runs on {backend} .*"
                                            "--config.platform=any"):
            sharding.require_platform(config)


def test_platform_check_on_this_machine_and_bad_values():
    with pytest.raises(UserError, match="JAX runs on cpu"):
        sharding.require_platform(config_from_flags(f"--config={REPO / 'configs' / 'zoomin_vitl14.py'}"))
    sharding.require_platform(config_from_flags(f"--config={REPO / 'configs' / 'zoomin_vitl14.py'}",
                                                "--config.platform=any"))
    sharding.require_platform(config_from_flags(f"--config={REPO / 'configs' / 'demo_cpu.py'}"))
    with pytest.raises(UserError, match="config.platform='cuda' is not one of accelerator, gpu, tpu, any"):
        sharding.require_platform(ConfigDict({"platform": "cuda"}))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model directory converted from a random open_clip test-tiny (as `convert import` writes it),
    and the params it holds, flat by name."""
    import open_clip
    import torch

    from zoomin_jax.convert.mapping import state_dict_to_params
    cfg = get_preset("test-tiny")
    torch.manual_seed(0)
    state_dict = {key: value.numpy() for key, value in open_clip.CLIP(**cfg.open_clip_cfg).state_dict().items()}
    params = state_dict_to_params(state_dict, cfg, "test-tiny", "open_clip")
    directory = tmp_path_factory.mktemp("tiny") / "model"
    model_dir.save(directory, cfg, params, model_dir.default_preprocess_cfg(cfg), preset="test-tiny")
    return directory, cfg, {sharding.path_name(path): np.asarray(leaf)
                            for path, leaf in traverse_util.flatten_dict(params).items()}


def by_name(tree) -> dict:
    return {sharding.path_name(path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def test_model_dir_restores_into_mesh_shardings(tiny_model):
    directory, cfg, saved = tiny_model
    mesh = sharding.make_mesh((("data", 2), ("fsdp", -1)))
    shardings = model_dir.param_shardings(cfg, mesh, RULES)
    params = by_name(model_dir.initial_params(str(directory), cfg, seed=0, shardings=shardings))
    wanted = by_name(shardings)
    assert params.keys() == saved.keys() == wanted.keys()
    for name, leaf in params.items():
        assert leaf.sharding == wanted[name], name
        np.testing.assert_array_equal(np.asarray(leaf), saved[name], err_msg=name)
    embedding = params["token_embedding/embedding"]  # [49408, 64]: split on its vocabulary dim
    assert embedding.sharding.spec == PartitionSpec("fsdp")
    assert {shard.data.shape for shard in embedding.addressable_shards} == {(49408 // 4, 64)}
    assert params["logit_scale"].sharding == NamedSharding(mesh, PartitionSpec())


def test_random_init_lands_in_the_same_shardings():
    cfg = get_preset("test-tiny")
    shardings = model_dir.param_shardings(cfg, sharding.make_mesh((("fsdp", -1),)), RULES)
    placed, wanted = by_name(model_dir.initial_params(None, cfg, seed=3, shardings=shardings)), by_name(shardings)
    plain = by_name(model_dir.initial_params(None, cfg, seed=3))
    assert all(leaf.sharding == wanted[name] and np.array_equal(leaf, plain[name]) for name, leaf in placed.items())


def test_model_dir_restores_whole_on_one_device_for_readers(tiny_model):
    directory, cfg, saved = tiny_model
    params = by_name(model_dir.params_numpy(directory, cfg))
    assert all(np.array_equal(params[name], value) for name, value in saved.items())


def test_two_processes_restore_their_own_shards(tiny_model, tmp_path):
    """Each of 2 processes (jax.distributed over gloo, 4 CPU devices each, started through the
    ZOOMIN_* variables as launch/gpu_local.py sets them) restores the model directory straight into
    fsdp shardings over all 8 devices and holds exactly its own devices' shards of the saved params."""
    directory, cfg, saved = tiny_model
    np.savez(tmp_path / "saved.npz", **saved)
    results = two_processes("model_dir_multiprocess.py", str(directory), str(tmp_path / "saved.npz"), out=tmp_path)
    assert [(r["process"], r["processes"], r["local_devices"]) for r in results] == [(0, 2, 4), (1, 2, 4)]
    # Every leaf has one shard per device: 4 on each process, none of them the other's.
    assert [r["shards"] for r in results] == [4 * len(saved)] * 2
    assert set(results[0]["devices"]).isdisjoint(results[1]["devices"])

