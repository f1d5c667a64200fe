"""emov2_gen."""
