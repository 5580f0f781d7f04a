"""pgraft: fine-tune and correct diffusion and flow checkpoints (GRAFT, P-GRAFT, inverse noise)."""

__version__ = "0.1.0"
