"""Is a string exactly one emoji? A small grammar of Unicode emoji sequences, no extra dependency.

Labels are compared as exact strings everywhere: "☹️" (U+2639 U+FE0F) and "☹" (U+2639) are two labels.
"""

# Code point ranges that hold Extended_Pictographic characters (Unicode emoji data), slightly widened
# to whole blocks where the block is almost all pictographs.
_PICTOGRAPHIC = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
    (0x2139, 0x2139), (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328),
    (0x23CF, 0x23CF), (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB),
    (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x27BF), (0x2934, 0x2935),
    (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55), (0x3030, 0x3030),
    (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299), (0x1F000, 0x1F1E5), (0x1F200, 0x1FAFF),
    (0x1FC00, 0x1FFFD),
)
_REGIONAL = (0x1F1E6, 0x1F1FF)
_SKIN_TONE = (0x1F3FB, 0x1F3FF)
_VS15, _VS16, _ZWJ, _KEYCAP = 0xFE0E, 0xFE0F, 0x200D, 0x20E3
_TAG = (0xE0020, 0xE007E)
_CANCEL_TAG = 0xE007F


def _in(cp: int, lo_hi) -> bool:
    return lo_hi[0] <= cp <= lo_hi[1]


def _pictographic(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _PICTOGRAPHIC)


def _element_end(cps: list[int], i: int) -> int:
    """Index after one emoji element starting at i (pictograph with modifiers), or -1."""
    n = len(cps)
    if not _pictographic(cps[i]) or _in(cps[i], _SKIN_TONE) and i > 0:
        return -1
    i += 1
    if i < n and cps[i] in (_VS15, _VS16):
        i += 1
    if i < n and _in(cps[i], _SKIN_TONE):
        i += 1
    if i < n and _in(cps[i], _TAG):  # subdivision flags such as England
        while i < n and _in(cps[i], _TAG):
            i += 1
        if i >= n or cps[i] != _CANCEL_TAG:
            return -1
        i += 1
    return i


def is_single_emoji(text: str) -> bool:
    """True when text is exactly one emoji: a pictograph (with variation selector, skin tone, tags),
    a ZWJ sequence of them, a keycap like 1️⃣, or a flag made of two regional indicators."""
    cps = [ord(c) for c in text]
    if not cps:
        return False
    if len(cps) == 2 and all(_in(c, _REGIONAL) for c in cps):
        return True
    if chr(cps[0]) in "0123456789#*":
        return cps[1:] in ([_VS16, _KEYCAP], [_KEYCAP])
    i = _element_end(cps, 0)
    while 0 < i < len(cps) and cps[i] == _ZWJ and i + 1 < len(cps):
        i = _element_end(cps, i + 1)
    return i == len(cps)


def count_emojis_hint(text: str) -> str:
    """A short description of why text is not one emoji, for error messages."""
    if not text:
        return "is empty"
    if not any(_pictographic(ord(c)) or _in(ord(c), _REGIONAL) for c in text):
        return "is not an emoji"
    if any(c.isalnum() and not _pictographic(ord(c)) for c in text):
        return "mixes text and emoji"
    if any(c.isspace() for c in text):
        return "holds several emojis separated by spaces"
    return "is more than one emoji"
