"""The MLX backend (Apple silicon; CPU on Linux): mlx + mlx-lm."""
