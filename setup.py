"""Build driver: setuptools hands kvfuse._C to CMake (+ ninja); CMakeLists.txt is the build description."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DKVFUSE_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    packages=[
        "kvfuse", "kvfuse.align", "kvfuse.models", "kvfuse.teacher", "kvfuse.fuse", "kvfuse.eval",
        "kvfuse.kernels",
        # the trainer, so `python train/main.py` and `deepspeed train/main.py` import `train.*` without path edits
        "train",
    ],
    package_data={"train": ["configs/*.yaml"], "kvfuse": ["data_files/*"]},
    ext_modules=[CMakeExtension("kvfuse._C")],
    cmdclass={"build_ext": CMakeBuild},
)
