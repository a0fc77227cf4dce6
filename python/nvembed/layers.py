"""nn.Module faces of the ops. (LatentAttentionPooling: owned by the latent-pool work.)"""
import torch


class LatentAttentionPooling(torch.nn.Module):
    pass
