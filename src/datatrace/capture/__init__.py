"""Layer capture: forward/backward hooks on supported layers (Linear, Conv2d, Conv1D), shared by K-FAC/EK-FAC and the
factorised projection."""
