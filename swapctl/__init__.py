"""swapctl: many models, one container each, behind one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
