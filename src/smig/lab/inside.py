"""Run async code inside a lab namespace, from a process that lives outside it.

The lab's network exists only inside its namespaces: the machine's own namespace has no address
on it, so the operator's side of the lab (``smig lab``, ``smig demo``) cannot reach the RC-TCB
from where it starts. A network namespace belongs to a *thread* (``setns(2)`` changes only the
calling thread's), so :func:`run_inside` runs an event loop on a fresh thread that first joins the
namespace: every socket made on that loop lives in the lab, and the rest of the process is
untouched. (Python 3.11 has no ``os.setns``; libc's is called through ctypes.)
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from smig.errors import SmigError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NamespaceError(SmigError):
    """A namespace could not be joined."""


def join_netns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``. Raises NamespaceError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NamespaceError(f"cannot open the network namespace {path}: {e.strerror} (is the lab up?)") from e
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NamespaceError(f"cannot join the network namespace {path}: {os.strerror(err)} (run as root)")
    finally:
        os.close(fd)


def run_inside(netns_path: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` to completion on an event loop in a thread inside ``netns_path``; its result
    or its exception comes back here. KeyboardInterrupt in the caller cancels it."""
    box: dict[str, Any] = {}
    started = threading.Event()

    def body() -> None:
        try:
            join_netns(netns_path)
            loop = asyncio.new_event_loop()
            box["loop"] = loop
            task = loop.create_task(main())
            box["task"] = task
            started.set()
            box["result"] = loop.run_until_complete(task)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
        finally:
            started.set()
            made = box.get("loop")
            if made is not None:
                made.close()

    thread = threading.Thread(target=body, name=f"netns:{os.path.basename(netns_path)}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        started.wait()
        loop, task = box.get("loop"), box.get("task")
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        thread.join(10)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]
