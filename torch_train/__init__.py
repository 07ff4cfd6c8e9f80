"""`dba train --backend torch`: the PyTorch trainer. The run loop, flags, data, log and artifacts
are train/'s framework-free modules; here are the torch step (step.py), the resumable training
state (checkpoints.py), the run that uses them (run.py) and the device check (devices.py).
Never imports JAX (the optional JAX-drawn initial weights come through train/init_weights.py)."""
