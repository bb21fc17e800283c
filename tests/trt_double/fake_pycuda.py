"""A strict fake of the pycuda subset quant uses: device memory is a dict of bytearrays addressed by int pointers.

Copies are checked (sizes, live allocations, stream objects) and counted, so tests can assert how many host<->device
copies a runner makes.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class FakeCudaError(RuntimeError):
    """What pycuda.driver raises on invalid memory use (LogicError / invalid value)."""


@dataclass
class DeviceState:
    memory: dict[int, bytearray] = field(default_factory=dict)
    freed: set[int] = field(default_factory=set)
    copies: dict[str, int] = field(default_factory=lambda: {"htod": 0, "dtoh": 0})
    streams: dict[int, "Stream"] = field(default_factory=dict)
    next_pointer: itertools.count = field(default_factory=lambda: itertools.count(0x7F0000000000, 0x100000))
    gpu_name: str = "Fake GPU"
    compute_capability: tuple[int, int] = (9, 0)

    def allocation(self, pointer: int) -> bytearray:
        if pointer in self.freed:
            raise FakeCudaError(f"device pointer {pointer:#x} was freed")
        if pointer not in self.memory:
            raise FakeCudaError(f"{pointer:#x} is not a device allocation")
        return self.memory[pointer]

    def read(self, pointer: int, nbytes: int) -> bytes:
        block = self.allocation(pointer)
        if nbytes > len(block):
            raise FakeCudaError(f"read of {nbytes} bytes from a {len(block)}-byte allocation at {pointer:#x}")
        return bytes(block[:nbytes])

    def write(self, pointer: int, data: bytes) -> None:
        block = self.allocation(pointer)
        if len(data) > len(block):
            raise FakeCudaError(f"write of {len(data)} bytes into a {len(block)}-byte allocation at {pointer:#x}")
        block[: len(data)] = data


class DeviceAllocation:
    def __init__(self, state: DeviceState, nbytes: int) -> None:
        if nbytes <= 0:
            raise FakeCudaError("cuMemAlloc of 0 bytes")
        self._state = state
        self.pointer = next(state.next_pointer)
        state.memory[self.pointer] = bytearray(nbytes)

    def __int__(self) -> int:
        return self.pointer

    def __index__(self) -> int:
        return self.pointer

    def free(self) -> None:
        if self.pointer in self._state.freed:
            raise FakeCudaError(f"double free of {self.pointer:#x}")
        self._state.freed.add(self.pointer)
        del self._state.memory[self.pointer]


class Stream:
    def __init__(self, state: DeviceState) -> None:
        self.handle = next(state.next_pointer)
        self.synchronized = 0
        state.streams[self.handle] = self

    def synchronize(self) -> None:
        self.synchronized += 1


def _pointer(dest: Any) -> int:
    if isinstance(dest, (DeviceAllocation, int)):
        return int(dest)
    raise FakeCudaError(f"expected a DeviceAllocation or int pointer, got {type(dest).__name__}")


def _host(array: Any, writable: bool = False) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise FakeCudaError(f"host side must be a numpy array, got {type(array).__name__}")
    if not array.flags["C_CONTIGUOUS"] or (writable and not array.flags["WRITEABLE"]):
        raise FakeCudaError("host array must be C-contiguous (and writable for device-to-host copies)")
    return array


def make_pycuda(state: DeviceState) -> dict[str, types.ModuleType]:
    """Modules `pycuda`, `pycuda.driver`, `pycuda.autoinit` sharing `state`."""
    driver = types.ModuleType("pycuda.driver")

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        return DeviceAllocation(state, int(nbytes))

    def memcpy_htod(dest: Any, src: Any) -> None:
        state.write(_pointer(dest), _host(src).tobytes())
        state.copies["htod"] += 1

    def memcpy_dtoh(dest: Any, src: Any) -> None:
        host = _host(dest, writable=True)
        host.view(np.uint8).reshape(-1)[:] = np.frombuffer(state.read(_pointer(src), host.nbytes), np.uint8)
        state.copies["dtoh"] += 1

    def _check_stream(stream: Any) -> None:
        if not isinstance(stream, Stream):
            raise FakeCudaError(f"expected a pycuda Stream, got {type(stream).__name__}")

    def memcpy_htod_async(dest: Any, src: Any, stream: Any = None) -> None:
        _check_stream(stream)
        memcpy_htod(dest, src)

    def memcpy_dtoh_async(dest: Any, src: Any, stream: Any = None) -> None:
        _check_stream(stream)
        memcpy_dtoh(dest, src)

    class Device:
        def name(self) -> str:
            return state.gpu_name

        def compute_capability(self) -> tuple[int, int]:
            return state.compute_capability

    class Context:
        @staticmethod
        def get_device() -> Device:
            return Device()

    driver.__dict__.update(
        mem_alloc=mem_alloc,
        memcpy_htod=memcpy_htod,
        memcpy_dtoh=memcpy_dtoh,
        memcpy_htod_async=memcpy_htod_async,
        memcpy_dtoh_async=memcpy_dtoh_async,
        Stream=lambda: Stream(state),
        Device=Device,
        Context=Context,
        DeviceAllocation=DeviceAllocation,
        Error=FakeCudaError,
    )
    autoinit = types.ModuleType("pycuda.autoinit")
    autoinit.__dict__.update(device=Device(), context=Context())
    package = types.ModuleType("pycuda")
    package.__path__ = []  # a package, so `import pycuda.driver` resolves through sys.modules
    package.__dict__.update(driver=driver, autoinit=autoinit)
    return {"pycuda": package, "pycuda.driver": driver, "pycuda.autoinit": autoinit}
