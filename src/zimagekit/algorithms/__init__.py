"""Training algorithms, one per file, each an Algorithm over the shared zimagekit.trainer loop."""
