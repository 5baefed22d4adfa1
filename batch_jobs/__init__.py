"""batch_jobs."""
