"""Host batches -> global jax Arrays on a mesh: every process contributes its own slice."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
              data_axes: tuple[str, ...] = ("data",)) -> dict[str, jax.Array]:
    """The leading (batch) axis is split over `data_axes`; the global batch is this process's local
    batch times the process count, assembled by jax.make_array_from_process_local_data."""
    sharding = NamedSharding(mesh, PartitionSpec(data_axes))
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}
