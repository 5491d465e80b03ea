"""The error a user can fix in ``params.recovery`` (or in how the recover stage was launched)."""


class RecoveryConfigError(ValueError):
    pass
