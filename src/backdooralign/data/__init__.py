"""Training and evaluation data: formats, sources, mixing of the arms, the one training-set
builder and the one evaluation-set loader."""
