"""Two-way conversion between open_clip checkpoints and zoomin_jax model directories."""
