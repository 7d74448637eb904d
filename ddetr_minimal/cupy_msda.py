"""Placeholder until the CuPy kernel wrapper lands: reports the kernel as unavailable."""


def is_available() -> bool:
    return False


def ms_deform_attn_cupy(*args):
    raise RuntimeError("backend='cupy' is not available in this build")
