"""Fake kernels and autograd for nvembed::latent_pool (owned by the latent-pool work)."""
