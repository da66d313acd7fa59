"""The one exception type pangkas raises for bad input and failed operations."""


class PangkasError(ValueError):
    """Invalid argument or failed operation; the model is left exactly as it was."""
