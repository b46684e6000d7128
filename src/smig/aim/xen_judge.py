"""Judging Xen's code as read from a host's memory against ``xen-syms`` (pure).

Every byte of ``.text`` must equal the file, except at the alternatives sites, where Xen's boot
may have written, over the site's length, one of the renderings its ``apply_alternatives`` makes:

- the original, its build-time NOP padding possibly rewritten with the CPU's ideal NOPs;
- the replacement (a relative ``call``/``jmp`` in it re-aimed from where it lies in the file to
  the site), the rest of the site NOPs;
- for an indirect call the site turns direct (``alternative_call``): a ``call`` to the start of
  a function of Xen's (or just past its ENDBR64), or ``UD2; UD0`` for a NULL pointer, the rest NOPs.

A differing byte that no rendering explains is a mismatch, named by the function it lies in.
"""

from __future__ import annotations

import bisect
import struct

from smig.aim.xen_syms import AltSite, XenSyms
from smig.model import Mismatch

TEXT_TARGET = "xen:.text"
# Intel's recommended multi-byte NOPs (P6) and AMD's K8 ones: what Xen's add_nops writes.
_NOPS = sorted(
    (
        bytes.fromhex(h)
        for h in (
            "90", "6690", "0f1f00", "0f1f4000", "0f1f440000", "660f1f440000", "0f1f8000000000",
            "0f1f840000000000", "660f1f840000000000", "666690", "66666690",
        )
    ),
    key=len,
    reverse=True,
)  # fmt: skip


def is_nops(data: bytes) -> bool:
    """True if ``data`` is a run of x86 NOP instructions (empty counts)."""
    at = 0
    while at < len(data):
        for nop in _NOPS:
            if data.startswith(nop, at):
                at += len(nop)
                break
        else:
            return False
    return True


def _relocated(site: AltSite) -> bytes:
    repl = bytearray(site.replacement)
    if len(repl) >= 5 and repl[0] & 0xFE == 0xE8:
        disp = struct.unpack_from("<i", repl, 1)[0] + (site.replacement_addr - site.addr)
        struct.pack_into("<i", repl, 1, disp)
    return bytes(repl)


def _legal(site: AltSite, now: bytes, original: bytes, function_starts: frozenset[int]) -> bool:
    if now == original:
        return True
    # The original, with a NOP tail rewritten (the original's own instructions untouched).
    for split in range(len(original), -1, -1):
        if is_nops(original[split:]) and now[:split] == original[:split] and is_nops(now[split:]):
            return True
    repl = _relocated(site)
    if now.startswith(repl) and is_nops(now[len(repl) :]):
        return True
    return _legal_altcall(site, now, original, function_starts)


def _legal_altcall(site: AltSite, now: bytes, original: bytes, function_starts: frozenset[int]) -> bool:
    """An indirect call or jump through a function pointer (``ff 15``/``ff 25``, RIP-relative)
    whose replacement is a direct one to itself (displacement -5): Xen aims it at the pointer's
    value at boot, past the target's ENDBR64 when built for CET-IBT; a NULL pointer gets
    ``UD2; UD0``. So: a direct branch to the start of one of Xen's functions (or 4 bytes in,
    past its ENDBR64), or that trap, then NOPs."""
    repl = site.replacement
    if len(repl) < 5 or repl[0] & 0xFE != 0xE8 or struct.unpack_from("<i", repl, 1)[0] != -5:
        return False
    if len(original) < 6 or original[0] != 0xFF or original[1] != (0x25 if repl[0] & 1 else 0x15):
        return False
    if not is_nops(now[5:]):
        return False
    if now[:5] == _TRAP:
        return True
    if now[0] != repl[0]:
        return False
    target = site.addr + 5 + struct.unpack_from("<i", now, 1)[0]
    return target in function_starts or target - 4 in function_starts


_TRAP = bytes.fromhex("0f0b0fffff")  # UD2; UD0: where a NULL function pointer would have been called


def judge_text(syms: XenSyms, now: bytes, *, limit: int = 16) -> list[Mismatch]:
    """The ranges of ``.text`` whose bytes in ``now`` (read at Xen's address) differ from the file
    and no alternatives rendering explains; at most ``limit`` of them."""
    ref = syms.text_bytes
    if len(now) != len(ref):
        return [Mismatch(TEXT_TARGET, 0, len(ref), f"read {len(now)} bytes of Xen's code, not {len(ref)}")]
    base = syms.text.addr
    starts = frozenset(a for a, _, _ in syms.functions)
    diffs = _diff_runs(ref, now)
    explained: set[int] = set()
    unexplained: set[tuple[int, int]] = set()
    for first, end in diffs:
        for site in syms.sites_in(base + first, base + end):
            lo, hi = site.addr - base, site.addr - base + site.length
            if lo in explained or (lo, hi) in unexplained:
                continue
            if _legal(site, now[lo:hi], ref[lo:hi], starts):
                explained.add(lo)
            else:
                unexplained.add((lo, hi))
    covered = _covered(syms, base, explained)
    bad: list[tuple[int, int]] = []
    for first, end in diffs:
        for lo, hi in _uncovered(first, end, covered):
            # A site no rendering explains is reported whole, once.
            for site_lo, site_hi in unexplained:
                if site_lo < hi and lo < site_hi:
                    lo, hi = min(lo, site_lo), max(hi, site_hi)
            bad.append((lo, hi))
    out: list[Mismatch] = []
    for lo, hi in _merge(bad)[:limit]:
        where = syms.function_at(base + lo)
        out.append(Mismatch(TEXT_TARGET, lo, hi - lo, f"Xen's code differs from xen-syms at {where}"))
    return out


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _diff_runs(a: bytes, b: bytes, page: int = 4096, chunk: int = 32) -> list[tuple[int, int]]:
    """[first, end) runs of differing bytes. Pages, then chunks, are compared whole first: most
    are equal, and comparing bytes one by one in Python is what costs."""
    runs: list[tuple[int, int]] = []
    for p in range(0, len(a), page):
        if a[p : p + page] == b[p : p + page]:
            continue
        for c in range(p, min(p + page, len(a)), chunk):
            end = min(c + chunk, len(a))
            if a[c:end] == b[c:end]:
                continue
            for i in range(c, end):
                if a[i] == b[i]:
                    continue
                if runs and runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], i + 1)
                else:
                    runs.append((i, i + 1))
    return runs


def _covered(syms: XenSyms, base: int, explained: set[int]) -> list[tuple[int, int]]:
    by_start = {s.addr - base: s.length for s in syms.alternatives}
    return sorted((lo, lo + by_start[lo]) for lo in explained)


def _uncovered(first: int, end: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [first, end) outside the sorted, non-overlapping ``covered`` ranges."""
    out, at = [], first
    i = max(0, bisect.bisect_right(covered, (first, 1 << 62)) - 1)
    for lo, hi in covered[i:]:
        if lo >= end:
            break
        if hi <= at:
            continue
        if lo > at:
            out.append((at, lo))
        at = max(at, hi)
    if at < end:
        out.append((at, end))
    return out
