"""The fork guard: CUDA's state does not survive fork.

A process that touched CUDA through this package records its pid; a process
forked from it afterwards sees another pid and refuses to use CUDA, with a
message that says why, instead of failing deep inside the driver. pmaprt's own
CPU workers are spawned interpreters, never forks, so they never trip it.
"""
import os

_cuda_pid = None          # pid of the process in which this package touched CUDA


def mark_cuda_used():
    global _cuda_pid
    if _cuda_pid is None:
        _cuda_pid = os.getpid()


def check_not_forked():
    if _cuda_pid is not None and _cuda_pid != os.getpid():
        raise RuntimeError(
            "pmaprt: CUDA was initialized in process %d, and this process (%d) is a fork "
            "of it: CUDA cannot be used in a forked child. Start workers with spawn "
            "(pmaprt's own workers are spawned), or map on the GPU in the parent."
            % (_cuda_pid, os.getpid()))

