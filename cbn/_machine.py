"""What the kernels' defaults need to know of this CPU, read once at import.

Linux only (``/proc/cpuinfo``, sysfs); elsewhere the readers return nothing
and the defaults are those measured on Intel Xeons.
"""
import glob
import os

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo, or '' if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``), or '' if unknown."""
    return _cpuinfo("vendor_id")


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC``), or '' if unknown."""
    return _cpuinfo("model name")


def l3_bytes() -> int | None:
    """The size of the L3 cache that CPU 0 shares, or None if unknown."""
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(index, "level")) as f:
                if f.read().strip() != "3":
                    continue
            with open(os.path.join(index, "size")) as f:
                return parse_size(f.read())
        except (OSError, ValueError):
            return None
    return None


def parse_size(text: str) -> int:
    """Bytes in a sysfs cache size such as ``32768K``."""
    text = text.strip()
    if text and text[-1].upper() in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1].upper()]
    return int(text)


def stream_threshold(vendor: str, l3: int | None) -> int:
    """Output size from which the kernels write with non-temporal stores.

    Such stores skip the read of each line that a plain store makes, and
    leave nothing in the caches.  On Intel Xeons they paid from 4 MiB up,
    whether or not the arrays fit in L3, whose bandwidth per core is little
    above memory's.  AMD's L3 is much faster than memory: there plain stores
    won until the arrays a call touches outgrow it (Zen 4, 32 MiB of L3: a
    16 MiB inference took 1.03-1.38x as long streamed, 32 MiB 0.84-0.97x),
    so streaming starts above half the L3.
    """
    if vendor == "AuthenticAMD" and l3:
        return max(4 << 20, l3 // 2 + 1)
    return 4 << 20
