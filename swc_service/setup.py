"""The one compiled part of the service: SwC's and PD's inner loops (src/swc_service/_kernels.c).

Plain C against the CPython API (no numpy headers). The float arithmetic must stay exactly as
written: no contraction into FMAs the code did not ask for, no fast-math reordering; the x86
SIMD path is chosen at run time, so one wheel serves every x86-64 CPU.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "swc_service._kernels",
            sources=["src/swc_service/_kernels.c"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math"],
        )
    ]
)
