"""Layer and channel scores: pure functions over captured statistics."""
