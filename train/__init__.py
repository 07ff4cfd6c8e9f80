"""JAX training: the typed run config, the Run and its hooks, the jitted step, Optax, Orbax, sharding, analysis."""
