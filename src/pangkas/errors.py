"""The exception types pangkas raises: bad input, and operations that failed."""


class PangkasError(ValueError):
    """Invalid argument or failed operation; the model is left exactly as it was."""


class OperationFailed(PangkasError):
    """The input was accepted but the work could not be completed (a write failed, surgery did
    not verify); as with every PangkasError, the model is left exactly as it was."""
