"""The one compiled part of the service: SwC's and PD's inner loops (src/swc_service/_kernels.c).

Plain C against the CPython API (no numpy headers). The float arithmetic must stay exactly as
written: no contraction into FMAs the code did not ask for, no fast-math reordering; the x86
SIMD path is chosen at run time, so one wheel serves every x86-64 CPU.

A wheel built from a checkout also carries the production Triton config
(``model_repository/visloc/config.pbtxt``) as ``swc_service/triton_model/config.pbtxt``, so
``swc_service.triton_config.PRODUCTION_CONFIG`` resolves outside the checkout too.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

CONFIG = Path(__file__).resolve().parent.parent / "model_repository" / "visloc" / "config.pbtxt"


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if CONFIG.is_file():  # absent in the service image's build context, which does not need it
            dest = Path(self.build_lib) / "swc_service" / "triton_model" / "config.pbtxt"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CONFIG, dest)


setup(
    cmdclass={"build_py": BuildPy},
    ext_modules=[
        Extension(
            "swc_service._kernels",
            sources=["src/swc_service/_kernels.c"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math"],
        )
    ],
)
