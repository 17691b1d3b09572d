"""The one exception type minimoe raises for bad input.

Every problem a user can cause -- a corrupt checkpoint, a config we do not
support, a token id out of range, a prompt longer than the context -- raises
:class:`MinimoeError` with a message that says what went wrong and where
(which file, which tensor, which position).  Bugs in minimoe itself still
surface as ordinary Python exceptions.
"""


class MinimoeError(Exception):
    """Bad input to minimoe: the message names the file, tensor or argument at fault."""
