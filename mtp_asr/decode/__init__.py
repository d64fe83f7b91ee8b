"""Decoding: greedy, threshold and verification MTP decoding, beam searches, lattices."""
