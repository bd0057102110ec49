from setuptools import Extension, find_packages, setup

# The C extension: one file per type or concern, sharing csrc/pmaprt.h.
CORE_SOURCES = ["csrc/module.c", "csrc/region.c", "csrc/ranges.c", "csrc/mapping.c",
                "csrc/buffers.c", "csrc/results.c"]

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
    # threadpoolctl: the joblib backend's inner_max_num_threads on a given pool
    install_requires=["numpy", "cloudpickle", "psutil", "threadpoolctl"],
    extras_require={
        # numba: tests/test_numpy.py counts its compilations per worker (skipped without it)
        "test": ["pytest", "hypothesis", "pytest-timeout", "joblib", "dask[distributed]",
                 "numba; python_version < '3.14'"],
        # scikit-learn: tests/conformance/sklearn_check.py
        "bench": ["joblib", "mpire", "matplotlib", "tqdm", "scikit-learn"],
        "gpu": ["cupy-cuda12x", "nvidia-ml-py", "numba"],
        "dask": ["dask[distributed]"],
        "joblib": ["joblib"],
    },
)
