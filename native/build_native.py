"""cffi build script for vmm._native (pygit2 style).

The cdef comes from native/decl/*.h (cffi's dialect: `...` lets the C compiler
fill in struct layouts and constant values from <linux/kvm.h>, so no KVM
number or offset is ever copied by hand).  The C sources in native/src/ are
compiled into the same extension; native/include/pyvmm_native.h is their
real C prototype header.
"""
import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
for decl in sorted(glob.glob(os.path.join(HERE, "decl", "*.h"))):
    with open(decl) as f:
        ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "vmm._native",
    '#include "pyvmm_native.h"\n',
    sources=[os.path.relpath(p) for p in sorted(glob.glob(os.path.join(HERE, "src", "*.c")))],
    include_dirs=[os.path.join(HERE, "include")],
    libraries=["seccomp"],          # seccomp-bpf filters (native/src/seccomp.c)
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
