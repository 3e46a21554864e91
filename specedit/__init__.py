"""SpecEdit: training-free speculative, mixed-resolution acceleration of diffusion image editing."""
