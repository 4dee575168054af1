"""Fetching from the web for the crawl stage: the HTTP client and its guards, robots, revalidation."""
