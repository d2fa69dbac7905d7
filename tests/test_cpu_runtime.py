"""tr_jax.cpu_runtime: glibc serves large blocks from its heap; XLA gets each flag once."""
import os
import subprocess
import sys

import pytest

from tr_jax import cpu_runtime

# Prints how many bytes glibc holds in mmap'd blocks while a 64 MB malloc block is live,
# minus before (mallinfo2's hblkhd); with argv[1] == "keep", after keep_freed_buffers().
MALLOC_PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "keep":
    from tr_jax.cpu_runtime import keep_freed_buffers
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

# configure() in a fresh process, then a convolution: prints what took effect for the setting
# argv[1] and XLA_FLAGS.
FLAG_PROBE = """
import os, sys, jax, jax.numpy as jnp
from tr_jax import cpu_runtime
setting = sys.argv[1]
print(cpu_runtime.configure()[setting])
print(cpu_runtime.configure()[setting])   # twice: the flag once
x = jnp.ones((1, 8, 8, 4))
jax.block_until_ready(jax.lax.conv(x.transpose(0, 3, 1, 2), jnp.ones((4, 4, 3, 3)), (1, 1),
                                   "SAME"))
print(getattr(cpu_runtime, setting)())   # after the backend started: no change
print(os.environ["XLA_FLAGS"])
"""
# (setting, the flag it adds, a user's own value of that flag)
FLAG_SETTINGS = [
    ("prefer_eigen_convolutions", cpu_runtime.EIGEN_CONV_FLAG,
     f"{cpu_runtime.YNN_FLAG}=individual_convolution"),
    ("prefer_legacy_loop_emitters", cpu_runtime.LEGACY_EMITTERS_FLAG,
     f"{cpu_runtime.EMITTERS_FLAG}=true"),
]


def _run(code: str, *args: str, env: dict | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    return out.stdout.strip().splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_buffers_serves_large_blocks_from_the_heap():
    assert int(_run(MALLOC_PROBE, "default")[-1]) >= 64 << 20   # glibc's default: an mmap
    assert int(_run(MALLOC_PROBE, "keep")[-1]) == 0
    assert cpu_runtime.keep_freed_buffers()        # idempotent (conftest applied it already)


@pytest.mark.parametrize("setting, flag, mine", FLAG_SETTINGS)
def test_flag_settings_set_their_flag_once_and_respect_the_users(setting, flag, mine):
    measured = cpu_runtime.jaxlib.__version__.startswith("0.10.")
    first, second, late, flags = _run(FLAG_PROBE, setting, env={"XLA_FLAGS": ""})
    assert (first, second) == (str(measured), str(measured))
    assert late == str(measured)     # already in XLA_FLAGS: reported, not added again
    assert flags.split().count(flag) == int(measured)
    first, _, _, flags = _run(FLAG_PROBE, setting, env={"XLA_FLAGS": mine})
    others = [f for _, f, _ in FLAG_SETTINGS if f != flag] if measured else []
    assert first == "False" and flags.split() == [mine, *others]   # only the other settings'


@pytest.mark.parametrize("setting", [s for s, _, _ in FLAG_SETTINGS])
def test_flag_settings_do_nothing_once_the_backend_runs(setting):
    code = ("import jax.numpy as jnp; jnp.ones(1).block_until_ready()\n"
            f"from tr_jax import cpu_runtime; print(cpu_runtime.{setting}())")
    assert _run(code, env={"XLA_FLAGS": ""}) == ["False"]


# prefer_eigen_convolutions() after JAX's private xla_bridge moved (argv[1] == "module") or
# lost backends_are_initialized ("function"): prints what it returned and XLA_FLAGS.
MOVED_BRIDGE_PROBE = """
import os, sys
import jax._src
from tr_jax import cpu_runtime
if sys.argv[1] == "module":
    del jax._src.xla_bridge
    sys.modules["jax._src.xla_bridge"] = None   # the import now raises ImportError
else:
    del jax._src.xla_bridge.backends_are_initialized
print(cpu_runtime.prefer_eigen_convolutions(), repr(os.environ["XLA_FLAGS"]))
"""


@pytest.mark.parametrize("moved", ["module", "function"])
def test_prefer_eigen_convolutions_leaves_the_flags_when_jax_moves_its_bridge(moved):
    """Without JAX's answer, it acts as if the backends had started: no flag, no error."""
    assert _run(MOVED_BRIDGE_PROBE, moved, env={"XLA_FLAGS": ""}) == ["False ''"]


@pytest.mark.parametrize("flags, isa", [("fpu sse2 avx avx2 avx512f avx512bw", "avx512"),
                                        ("fpu sse2 avx avx2 fma", "avx2"),
                                        ("fpu sse2 avx", "avx"), ("fpu sse2", "noavx")])
def test_cpu_features_reads_model_and_widest_isa(tmp_path, flags, isa):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: {flags}\n")
    assert cpu_runtime.cpu_features(str(cpuinfo)) == ("AMD EPYC 9B14", isa)


def test_cpu_features_without_x86_flags_says_unknown(tmp_path):
    arm = tmp_path / "cpuinfo"   # an ARM cpuinfo: "Features", no "flags" or "model name"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n")
    for path in (arm, tmp_path / "missing"):
        model, isa = cpu_runtime.cpu_features(str(path))
        assert isa == "unknown" and model


def test_describe_machine_names_this_machine():
    model, isa = cpu_runtime.cpu_features()
    line = cpu_runtime.describe_machine()
    assert f"({model}, {isa})" in line and line.endswith(f"{os.cpu_count()} cores")
