"""The PyTorch boundary: the only package of this project that imports torch / diffusers / safetensors."""
