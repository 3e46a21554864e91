"""Verification of draft edits against the source (SpecEdit verifier building blocks)."""
