"""The toy editor: synthetic paired edits, a small Kontext-architecture editor trained here, demo and eval."""
