"""The op: multi-scale deformable attention and its backends (chapters 2-4).

* :mod:`.msda` -- ``ms_deform_attn``, its notation and backend dispatch;
* :mod:`.checks` -- the input checks every backend relies on;
* :mod:`.reference` -- the ``loop`` backend, bilinear interpolation spelled out;
* :mod:`.grid_sample` -- the ``torch`` backend, vectorised with ``grid_sample``;
* :mod:`.cupy_kernel` -- the CUDA kernel of ``kernels/msda.cu`` through CuPy;
* :mod:`.emulation` -- the same kernel source compiled for and run on the CPU.
"""
