"""Host batches -> global jax Arrays on a mesh: every process contributes its own slice."""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def to_global(batch, mesh: jax.sharding.Mesh, data_axes: tuple[str, ...] = ("data",)):
    """Each array of a (possibly nested) batch, its leading axis split over `data_axes`; the global
    batch is this process's local batch times the process count, assembled by
    jax.make_array_from_process_local_data."""
    sharding = NamedSharding(mesh, PartitionSpec(data_axes))
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value), batch)
