"""The `dba` console script and its commands (one module each).

The only package that sees every other one: commands parse flags here and call into `dba`
(framework-free), `train` (JAX training), `jax_model`, `torch_ref` and `bench`, importing each
only when the command that needs it runs.
"""
