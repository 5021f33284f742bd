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

Nothing outlives the process that started it, however that ends (an exception, Ctrl-C, SIGKILL from the OOM
killer): every worker runs `tie_to_parent` first, which is where the reasons are.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.forkserver
import os
import signal
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def tie_to_parent(_worker_id: int | None = None) -> None:
    """Run first in every worker process (the DataLoader's `worker_init_fn`, the Pool's `initializer`, the
    .beton writer): the worker then ends when the process that started it ends, a SIGKILL included, and never
    keeps a forkserver alive. Nothing else would end it: a SIGKILL runs no clean-up in the killed process, and

    - torch's DataLoader worker watches its parent's pid; under the forkserver that parent is the server, not
      the trainer. A Pool worker watches nothing: between tasks it ends when the other end of its queue closes,
      but inside one (a long decode, a read that hangs on a network file) it runs on.
    - The forkserver exits when every copy of the write end of its "alive" pipe is closed. The process that
      started the server holds one, and CPython hands one to every child the server forks (so that a child may
      ask the same server for processes). So the workers kept the server alive, and it kept them.

    What this does: on Linux, prctl(PR_SET_PDEATHSIG, SIGKILL), so that the kernel kills this worker when its
    parent dies; then, in a child of the forkserver, it closes the inherited "alive" fd. The server then exits
    when the process that started it ends, and its workers die with it. The order matters: while this worker
    still holds the fd the server cannot exit on its own, so the death signal is tied to a living parent. A
    forked worker's parent is the starting process itself, which may have died between the fork and the prctl:
    then the worker's parent pid is no longer its pid, and the worker exits at once. The resource tracker exits
    when every process holding its pipe has, so it goes with them.

    The death signal follows the thread that forked the worker: the server forks from its only thread; a process
    that forks workers itself must do it from a thread that lives as long as they (DataLoader's iter() and the
    Pool's constructor run on the caller's thread; here, the main thread). Elsewhere than Linux there is no death
    signal, but closing the fd still lets the server exit, and torch's watchdog then sees its parent change.
    `_worker_id`: what DataLoader passes to `worker_init_fn`; unused."""
    server = multiprocessing.forkserver._forkserver  # CPython's per-process state (no public accessor)
    from_server = server.get_inherited_fds() is not None  # None except in a child of the forkserver
    parent = multiprocessing.parent_process()
    _die_with_parent(None if from_server or parent is None else parent.pid)
    if from_server and getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def forks_tied_to_parents() -> None:
    """Every child this process forks from now on with os.fork (multiprocessing's fork start does, e.g. for
    FFCV's writer processes, which take no initializer) dies with it, as `tie_to_parent` makes a worker do; and
    so on down: the children inherit the rule."""
    forking = {}  # the pid of the process that forks, recorded just before the fork
    os.register_at_fork(before=lambda: forking.update(pid=os.getpid()),
                        after_in_child=lambda: _die_with_parent(forking["pid"]))


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: the kernel sends this process SIGKILL when its parent dies. `parent_pid`: the parent it must
    have; if it already has another (the parent died first), the process exits at once."""
    if sys.platform != "linux":
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG, SIGKILL) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # nobody is left to read this process's results


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
