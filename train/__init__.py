"""JAX training: loop, optimizer chain, schedules, checkpointing, metrics."""
