"""Text filters for normalize and fine-tuning: quality rules and PII scrubbing."""
