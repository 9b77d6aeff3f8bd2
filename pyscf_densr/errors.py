"""The package's exceptions (no imports: the network module uses them without PySCF)."""


class DensrError(RuntimeError):
    """The densr guess cannot be made for this input."""


class NotApplicable(DensrError):
    """An SCF the densr guess does not cover by design (4-component, no atoms or electrons,
    a periodic cell): with the default fallback it gets PySCF's own guess and a note."""


class ModelError(DensrError):
    """A model file or config that cannot be used (missing, corrupt, mismatched)."""


class OptionError(ValueError):
    """A guess option with a value it cannot take; raised whatever the fallback policy."""


class SCFOwnError(Exception):
    """An error raised by the SCF object's own method inside the guess (its ``get_occ``
    cannot occupy the orbitals, say): the SCF cannot run from any guess, so the guess
    re-raises the original (``__cause__``) instead of handing over to another guess."""
