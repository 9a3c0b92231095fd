"""scope-ray: information-scope analysis of ViT sparse autoencoders on Ray."""

__version__ = "0.1.0"
