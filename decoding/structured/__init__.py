"""Schema-constrained generation: the bytes each token stands for, and the grammar indexes built on them."""
