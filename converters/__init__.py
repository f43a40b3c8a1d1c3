"""ixc25-convert: official PyTorch checkpoint <-> our MindSpore directory (modules listed in notes/conversion.md)."""
