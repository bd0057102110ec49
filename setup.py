from setuptools import Extension, find_packages, setup

# The C extension: one file per type or concern, sharing csrc/pmaprt.h.
CORE_SOURCES = ["csrc/module.c", "csrc/region.c", "csrc/ranges.c", "csrc/mapping.c",
                "csrc/buffers.c", "csrc/results.c", "csrc/reduce.c",
                "csrc/collective.c", "csrc/writetrack.c"]

setup(
    name="pmaprt",
    version="0.1.0",
    description="A parallel-map runtime: map over every core, through shared memory.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pmaprt", "pmaprt.*"]),
    package_data={"pmaprt": ["_core.pyi"]},
    python_requires=">=3.9",
    ext_modules=[
        Extension(
            "pmaprt._core",
            sources=CORE_SOURCES,
            depends=["csrc/pmaprt.h"],
            # hidden: the files share functions, the module exports only PyInit__core
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-fvisibility=hidden"],
        )
    ],
    # tqdm: progress=True's bar (small, pure Python: a dependency, not an extra);
    # threadpoolctl: the joblib backend's inner_max_num_threads on a given pool
    install_requires=["numpy", "cloudpickle", "psutil", "tqdm", "threadpoolctl", "xxhash"],
    extras_require={
        # numba: tests/test_numpy.py counts its compilations per worker, and its CUDA
        # simulator runs the GPU path (skipped without it). CuPy and NCCL import without a
        # GPU: the GPU tests check pmaprt's calls against their real API (skipped without).
        # scikit-learn: the data-parallel example trains on its bundled digits;
        # ml_dtypes: bfloat16 arrays for the all-reduce's half precisions
        "test": ["pytest", "hypothesis", "pytest-timeout", "joblib", "dask[distributed]",
                 "numba; python_version < '3.14'", "scikit-learn", "ml_dtypes",
                 "cupy-cuda12x; platform_system == 'Linux' and python_version < '3.14'",
                 "nvidia-nccl-cu12>=2.18.1,<3; platform_system == 'Linux'"],
        "bench": ["joblib", "mpire", "matplotlib", "scikit-learn", "ml_dtypes"],
        "gpu": ["cupy-cuda12x", "nvidia-ml-py", "numba"],
        "dask": ["dask[distributed]"],
        "joblib": ["joblib"],
    },
)
