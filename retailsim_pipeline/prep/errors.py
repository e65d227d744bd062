"""The two ways a weekly LGSR file is refused as a whole (nothing is written for it)."""


class LgsrFormatError(ValueError):
    """The file is not an LGSR transaction file at all (wrong or missing header, unreadable)."""


class LossyCopyError(LgsrFormatError):
    """The file is an LGSR file whose ids were destroyed by a lossy copy (a spreadsheet round trip)."""
