"""Vertebra label ids: VerSe ids and names, TotalSegmentator (v2) ids, anatomical order.

VerSe ids: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum, 28 T13 (a transitional thoracic
vertebra that sits between T12 and L1).
"""

from __future__ import annotations

from collections.abc import Iterable

from healthivert.errors import InputDataError

#: VerSe id -> name.
VERSE_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i: f"T{i - 7}" for i in range(8, 20)},
    **{i: f"L{i - 19}" for i in range(20, 26)},
    26: "S",
    28: "T13",
}

#: name -> VerSe id (``"S1"`` is accepted for the sacrum).
VERSE_IDS: dict[str, int] = {name: vid for vid, name in VERSE_NAMES.items()} | {"S1": 26}

#: TotalSegmentator v2 id -> VerSe id (26 S1, 27 L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1).
TOTALSEG_TO_VERSE: dict[int, int] = {
    26: 26,
    **{27 + k: 24 - k for k in range(5)},  # 27 L5 (24) ... 31 L1 (20)
    **{32 + k: 19 - k for k in range(12)},  # 32 T12 (19) ... 43 T1 (8)
    **{44 + k: 7 - k for k in range(7)},  # 44 C7 (7) ... 50 C1 (1)
}

# Position along the spine, cranial (small) to caudal (large); T13 between T12 (19) and L1 (20).
_RANK: dict[int, float] = {vid: float(vid) for vid in VERSE_NAMES} | {28: 19.5}


def vertebra_name(verse_id: int) -> str:
    """Name of a VerSe id, e.g. ``20 -> "L1"``; unknown ids give ``"V<id>"``."""
    return VERSE_NAMES.get(int(verse_id), f"V{int(verse_id)}")


def vertebra_id(name: str) -> int:
    """VerSe id of a vertebra name (``"L1"`` -> 20), case-insensitive.

    Raises:
        InputDataError: the name is not a vertebra.
    """
    key = name.strip().upper()
    if key not in VERSE_IDS:
        raise InputDataError(name, "unknown vertebra name", "expected C1-C7, T1-T13, L1-L6 or S1")
    return VERSE_IDS[key]


def is_vertebra(verse_id: int) -> bool:
    """Whether ``verse_id`` is a known VerSe vertebra id (sacrum included)."""
    return int(verse_id) in VERSE_NAMES


def anatomical_rank(verse_id: int) -> float:
    """Position of a VerSe id along the spine, increasing cranial -> caudal (T13 between T12 and L1)."""
    return _RANK.get(int(verse_id), float(verse_id))


def sort_cranio_caudal(ids: Iterable[int]) -> list[int]:
    """VerSe ids in anatomical order, cranial first (``[20, 28, 19] -> [19, 28, 20]``)."""
    return sorted((int(v) for v in ids), key=anatomical_rank)


def totalseg_to_verse(ts_id: int) -> int:
    """VerSe id of a TotalSegmentator v2 vertebra id, 0 for any non-vertebra class."""
    return TOTALSEG_TO_VERSE.get(int(ts_id), 0)
