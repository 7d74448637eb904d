"""CUDA C sources of the multi-scale deformable attention kernel (installed as ddetr_minimal.kernels)."""
