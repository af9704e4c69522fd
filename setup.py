"""Only the C extension lives here; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "snapshotter.index._native",
            sources=["snapshotter/index/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
