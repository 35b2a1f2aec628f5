"""Records: the versioned per-rank JSON Lines contract between training and reporting."""
