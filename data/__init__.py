"""Storage by URL, image preprocessing, the shard formats and their readers, built-in datasets."""
