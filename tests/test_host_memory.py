"""tr_jax.host_memory: after keep_freed_buffers, glibc serves large blocks from its heap."""
import subprocess
import sys

import pytest

from tr_jax import host_memory

# Prints how many bytes glibc holds in mmap'd blocks while a 64 MB malloc block is live,
# minus before (mallinfo2's hblkhd); with argv[1] == "keep", after keep_freed_buffers().
PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "keep":
    from tr_jax.host_memory import keep_freed_buffers
    assert keep_freed_buffers()
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(ctypes.c_void_p(block))
"""


def _mmapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_buffers_serves_large_blocks_from_the_heap():
    assert _mmapped_bytes("default") >= 64 << 20   # glibc's default: a fresh mmap
    assert _mmapped_bytes("keep") == 0
    assert host_memory.keep_freed_buffers()        # idempotent (conftest applied it already)
