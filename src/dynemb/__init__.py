"""dynemb: dynamic user-interest embeddings from multimodal behaviour, served by Triton."""

__version__ = "0.1.0"
