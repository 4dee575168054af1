"""Near-duplicate detection for the dedupe stage: MinHash signatures and the LSH index."""
