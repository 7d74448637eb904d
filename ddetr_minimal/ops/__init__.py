"""The op: multi-scale deformable attention and its backends (chapters 2-4).

* :mod:`.msda` -- ``ms_deform_attn``, its notation table and backend choice;
* :mod:`.checks` -- the input checks every backend relies on, and the level table read once;
* :mod:`.library` -- the op as a ``torch.library`` custom operator (fake, autograd, compile);
* :mod:`.reference` -- the ``loop`` backend, bilinear interpolation spelled out;
* :mod:`.torch_backend` -- the ``torch`` backend: :mod:`.sparse` (the op as sparse matrix
  products, on the CPU) or :mod:`.grid_sample` (one ``grid_sample`` per level, on GPUs);
* :mod:`.cupy_kernel` -- the CUDA kernel of ``kernels/msda.cu`` through CuPy;
* :mod:`.selftest` -- does the kernel work on this device? (what ``"auto"`` asks first);
* :mod:`.cuda_versions` -- does CuPy's CUDA match torch's?;
* :mod:`.emulation` -- the same kernel source compiled for and run on the CPU;
* :mod:`.random_inputs` -- random op inputs for tests, chapters and benchmarks.
"""
