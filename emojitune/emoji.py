"""Is a string exactly one emoji? One user-perceived character (a Unicode grapheme cluster) that is a
pictograph, a flag or a keycap, with the `regex` module's Unicode properties.

Labels are compared as exact strings everywhere: "☹️" (U+2639 U+FE0F) and "☹" (U+2639) are two labels.
"""

import regex

# A pictograph (with its variation selector, skin tone, tags or ZWJ partners), a flag made of two
# regional indicators, or a keycap such as 1️⃣.
_EMOJI_START = regex.compile(r"\p{Extended_Pictographic}|\p{Regional_Indicator}{2}|[0-9#*]\uFE0F?\u20E3")
_PICTOGRAPH = regex.compile(r"[\p{Extended_Pictographic}\p{Regional_Indicator}]")


def is_single_emoji(text: str) -> bool:
    """True when text is exactly one emoji: a pictograph (with variation selector, skin tone, tags),
    a ZWJ sequence of them, a keycap like 1️⃣, or a flag made of two regional indicators."""
    return regex.fullmatch(r"\X", text) is not None and _EMOJI_START.match(text) is not None


def count_emojis_hint(text: str) -> str:
    """A short description of why text is not one emoji, for error messages."""
    if not text:
        return "is empty"
    if not _PICTOGRAPH.search(text):
        return "is not an emoji"
    if any(c.isalnum() and not _PICTOGRAPH.match(c) for c in text):
        return "mixes text and emoji"
    if any(c.isspace() for c in text):
        return "holds several emojis separated by spaces"
    return "is more than one emoji"
