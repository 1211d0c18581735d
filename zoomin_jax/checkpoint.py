"""Orbax checkpoints of a training run (docs/design.md §9): the train state (trainable params, optimizer
state, step), every process's Grain iterator position per level, and the config. Saves are async;
keep-last-N plus an optional periodic keep; resume reads the latest complete step (orbax writes
into a temporary directory and renames it when done, so a killed save is never picked up).

Reading a run back (export, load_clip, evaluate) takes the config and the trainable params alone:
their shapes come from the checkpoint's own metadata, so neither the optimizer nor the data
pipeline is rebuilt, and a change to either never stops an old run from loading."""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from zoomin_jax import storage
from zoomin_jax.errors import UserError
from zoomin_jax.sharding import path_name


class Checkpoints:
    def __init__(self, directory, *, every: int, keep: int = 3, keep_period: int | None = None):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, keep_period=keep_period,
                                               enable_async_checkpointing=True, create=True)
        self.directory = storage.absolute(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has(self, step: int) -> bool:
        return step in self.manager.all_steps()

    def save(self, step: int, state, iterators: dict, config: dict, force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); returns whether it did. The write continues in the
        background; the next save (or `close`) waits for it."""
        import grain
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
            **{f"data_{level}": grain.checkpoint.CheckpointSave(it) for level, it in iterators.items()}))

    def restore(self, step: int, abstract_state, iterators: dict):
        """The state laid out as `abstract_state` (ShapeDtypeStructs carrying shardings); the
        iterators are moved to where they were."""
        import grain
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            **{f"data_{level}": grain.checkpoint.CheckpointRestore(it) for level, it in iterators.items()}))
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def complete_steps(directory) -> list[int]:
    manager = ocp.CheckpointManager(storage.absolute(directory), options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def read_config(directory, step: int) -> dict:
    """The config saved with `step` (as JSON)."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(storage.absolute(directory) / str(step) / "config")


def read_params(directory, step: int, like: dict, sharding: jax.sharding.Sharding) -> dict:
    """The trainable params saved with `step`, alone (no optimizer state is read), nested with the
    keys of `like` (the run's full param tree) and placed by `sharding`."""
    path = storage.absolute(directory) / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        saved = ocp.PyTreeCheckpointHandler().metadata(path).tree["params"]
        # Orbax keys the saved tree by strings ("resblocks"/"0"): address leaves by their names.
        by_name = {tuple(str(key) for key in leaf_path): leaf_path for leaf_path in traverse_util.flatten_dict(like)}
        target = {}
        for saved_path, meta in traverse_util.flatten_dict(saved).items():
            if saved_path not in by_name:
                raise UserError(f"{path} holds a param the run's model does not have: {path_name(saved_path)}")
            target[saved_path] = jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)
        nested = traverse_util.unflatten_dict(target)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item={"params": nested}, partial_restore=True,
            restore_args={"params": jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding), nested)}))
    flat = traverse_util.flatten_dict(restored["params"])
    return traverse_util.unflatten_dict({by_name[saved_path]: leaf for saved_path, leaf in flat.items()})
