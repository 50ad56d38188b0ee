"""`coltran demo`: the whole flow on one machine on photos generated on the spot."""
