"""Measure the link to a remote device: the latency α of one RPC round trip and the bandwidth
β of a copy, so that moving ``n`` bytes costs about ``α + n / β`` seconds (what placement
charges an edge between devices)."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from qcompile.backends.rpc.session import connect, remote_error
from qcompile.backends.rpc.url import RemoteTarget, parse_target

__all__ = ["Link", "measure_link"]


class Link(NamedTuple):
    """A fitted link: ``(latency_s, bandwidth_Bps)``."""

    latency_s: float
    bandwidth_Bps: float

    def seconds(self, nbytes: int) -> float:
        """The modelled time to copy ``nbytes`` across the link."""
        return self.latency_s + nbytes / self.bandwidth_Bps


def _copy_times(dst, src: np.ndarray, repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):  # the first copies allocate, fault pages in, wake cores up
        dst.copyfrom(src)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copyfrom(src)  # an RPC call: returns once the remote holds the bytes
        times.append(time.perf_counter() - t0)
    return times


def measure_link(target: str | RemoteTarget, *, sizes=(1 << 20, 8 << 20),
                 repeat: int = 5) -> Link:
    """Fit ``α + bytes/β`` to uploads to ``target``'s remote (an ``rpc://`` name).

    α is the median time to copy a 4-byte array up (one round trip: the call returns when the
    remote has it); β comes from copies of ``sizes`` bytes, by least squares through α over
    every sample (``repeat`` per size, after a warm-up). Uploads stand for both directions
    (over loopback, downloads measured within 5% of them)."""
    import tvm
    where = target if isinstance(target, RemoteTarget) else parse_target(target)
    remote = connect(where)
    rng = np.random.default_rng(0)
    with remote.lock:
        try:
            tiny = np.zeros(1, "float32")
            alpha = float(np.median(_copy_times(tvm.runtime.empty((1,), "float32", remote.dev),
                                                 tiny, max(repeat, 21), warmup=50)))
            num = den = 0.0
            for n in sizes:
                src = rng.integers(0, 256, int(n), dtype=np.uint8)
                dst = tvm.runtime.empty((int(n),), "uint8", remote.dev)
                for t in _copy_times(dst, src, repeat):
                    num += n * (t - alpha)
                    den += float(n) * n
                del dst
        except Exception as e:  # noqa: BLE001
            raise remote_error(where, "measuring the link", e) from None
    per_byte = num / den if den else 0.0
    if not per_byte > 0:  # copies no slower than a round trip: a bound, not a measurement
        per_byte = alpha / max(sizes)
    return Link(max(alpha, 1e-9), 1.0 / per_byte)
