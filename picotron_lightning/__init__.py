"""picotron-lightning: 3D and expert parallelism for PyTorch Lightning."""

__version__ = "0.1.0"
