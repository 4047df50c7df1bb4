"""Content-hash keys and the result stores."""
