"""Host batches -> global jax Arrays on a mesh: every process contributes its own slice."""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def batch_sharding(mesh: jax.sharding.Mesh, data_axes: tuple[str, ...] = ("data",)) -> NamedSharding:
    """A batch's layout: its leading axis split over `data_axes`."""
    return NamedSharding(mesh, PartitionSpec(data_axes))


def to_global(batch, mesh: jax.sharding.Mesh, data_axes: tuple[str, ...] = ("data",)):
    """Each array of a (possibly nested) batch laid out by batch_sharding; the global batch is this
    process's local batch times the process count, assembled by
    jax.make_array_from_process_local_data."""
    sharding = batch_sharding(mesh, data_axes)
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value), batch)
