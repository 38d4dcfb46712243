"""Third-party reference code vendored for parity tests only (each directory carries its LICENSE)."""
