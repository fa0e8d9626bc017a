"""jaxdl: a JAX/Flax functional training and fine-tuning pipeline."""

__version__ = "0.1.0"
