"""Orbax checkpoints of a training run (DESIGN.md §8): the train state (trainable params, optimizer
state, step), every process's Grain iterator position per level, and the config. Saves are async;
keep-last-N plus an optional periodic keep; resume reads the latest complete step (orbax writes
into a temporary directory and renames it when done, so a killed save is never picked up)."""
from __future__ import annotations

import grain
import orbax.checkpoint as ocp
from etils import epath


class Checkpoints:
    def __init__(self, directory, *, every: int, keep: int = 3, keep_period: int | None = None):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, keep_period=keep_period,
                                               enable_async_checkpointing=True, create=True)
        self.directory = epath.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has(self, step: int) -> bool:
        return step in self.manager.all_steps()

    def save(self, step: int, state, iterators: dict, config: dict, force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); returns whether it did. The write continues in the
        background; the next save (or `close`) waits for it."""
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
            **{f"data_{level}": grain.checkpoint.CheckpointSave(it) for level, it in iterators.items()}))

    def restore(self, step: int, abstract_state, iterators: dict):
        """The state laid out as `abstract_state` (ShapeDtypeStructs carrying shardings); the
        iterators are moved to where they were."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            **{f"data_{level}": grain.checkpoint.CheckpointRestore(it) for level, it in iterators.items()}))
        return restored["state"]

    def config(self, step: int) -> dict:
        """The config saved with `step` (as JSON)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
