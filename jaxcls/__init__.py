"""jaxcls: train image classifiers with JAX and Flax, from one CPU to a TPU pod (docs/ARCHITECTURE.md)."""
