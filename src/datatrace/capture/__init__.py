"""Layer capture: the table of supported layer kinds (Linear, Conv2d, Conv1d, transformers' Conv1D) and the one hook
engine shared by K-FAC/EK-FAC and the factorised projection."""
