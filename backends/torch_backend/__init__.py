"""The PyTorch backend (CUDA, MPS, CPU): transformers + PEFT."""
