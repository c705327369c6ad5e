"""Named terms of use of source data, for `prepare-data --source-terms NAME` and the cards it writes; plain text, so
that the command line can list the names without importing the card machinery."""

KVASIR_LICENSE_NOTE = (
    "Kvasir-SEG (Jha et al., MMM 2020, Simula) may be used for research and education; cite "
    '"Kvasir-SEG: A Segmented Polyp Dataset" when you use it. Check the terms of the original release '
    "before redistributing."
)
SOURCE_TERMS = {"kvasir-seg": KVASIR_LICENSE_NOTE}
UNKNOWN_TERMS = "Check the license of the source data."
