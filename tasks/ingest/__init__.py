"""Reading documents from files for the crawl stage: WARC, folders, JSONL."""
