"""Evaluation of generated images: prompt alignment read off the pixels, and a Fréchet distance."""
