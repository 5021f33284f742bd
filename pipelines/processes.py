"""How the project starts worker processes (torchvision's DataLoader workers, the converter's pool) safely.

fork() copies only the calling thread. In a process where DALI's, FFCV's (numba's TBB pool), CUDA's or torch's
threads run, the child inherits their locks in whatever state they were, and can deadlock or abort: numba's TBB
layer prints "Unable to join threads to shut down before fork()", and building every loader in one process
before a DataLoader forked its workers once ended in SIGABRT. So a process with more than one OS thread starts
its workers from a forkserver: a fresh process started with exec, which has done nothing but import modules
(`context(preload)`), and forks each worker.
A single-threaded process (a fresh CLI before any library started a thread) still forks: nothing to inherit.

Start-up of 2 DataLoader workers until the first batch of a trivial dataset (`python -m pipelines.processes`,
2 cores shared with other jobs, load ~7, so every import is slow): fork 0.8 s; forkserver 41 s every time
(each worker imports torch to unpickle what it runs); spawn 33-41 s; forkserver preloading torch and the
dataset's module (what `context(preload)` does) 39 s for the first loader of a process (the server imports
them once) and 0.4 s for each later one. Persistent workers pay it once per loader, not per epoch. numpy's
OpenBLAS pool is a second thread as soon as numpy is imported, so in this project's processes the forkserver
is the rule and fork the exception.
"""
from __future__ import annotations

import multiprocessing
import os
import sys


def os_threads() -> int:
    """Threads of this process as the OS counts them (libraries' native threads too, not just Python's)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc (macOS): assume threads, the safe side
        return 2


def start_method() -> str:
    """'fork' while this process runs one thread (the fastest start, and safe then), else 'forkserver'."""
    if sys.platform == "linux" and os_threads() == 1:
        return "fork"
    return "forkserver"


def context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for new workers, decided now (threads start as libraries load).
    `preload`: the modules the workers need, imported once by the forkserver before it forks any of them
    (importing them starts no thread but OpenBLAS's pool, whose fork handlers make forking safe). The server is one per process and
    takes the list of the first caller that starts it; a worker imports whatever else it needs itself. A
    project module in the list loads there when the process runs from the repo root (the CLIs, the tests):
    the server starts with the process's working directory on its path, not its sys.path."""
    method = start_method()
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(preload)
    return ctx


def _measure(workers: int = 2, repeats: int = 2) -> None:
    """Seconds from a DataLoader's iter() to its first batch, per start method (each in a fresh process)."""
    import subprocess
    import textwrap
    code = textwrap.dedent(f"""
        import multiprocessing, sys, time, torch
        from torch.utils.data import DataLoader
        sys.path.insert(0, {os.getcwd()!r})
        from pipelines import processes
        method, preload = sys.argv[1], sys.argv[2] == "preload"
        ctx = multiprocessing.get_context(method)
        if method == "forkserver" and preload:
            ctx.set_forkserver_preload(["torch", "pipelines.loaders.torchvision"])
        times = []
        for _ in range({repeats}):
            start = time.perf_counter()
            next(iter(DataLoader(list(range(64)), batch_size=8, num_workers={workers}, multiprocessing_context=ctx)))
            times.append(round(time.perf_counter() - start, 2))
        print(method, "preload" if preload else "", times)
    """)
    for method, preload in (("fork", ""), ("forkserver", ""), ("forkserver", "preload"), ("spawn", "")):
        subprocess.run([sys.executable, "-c", code, method, preload or "none"], check=True)


if __name__ == "__main__":
    _measure()
