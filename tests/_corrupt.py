"""Damage a saved checkpoint the way a bad disk or a torn copy does (shared by tests)."""

from pathlib import Path


def flip_a_byte(step_dir: Path) -> Path:
    """Flip one byte in the middle of the largest array data file: same size, wrong bytes."""
    victim = max((p for p in (step_dir / "state").rglob("d/*")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim
