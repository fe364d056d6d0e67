"""Audio in and out, subtitle segments, and the speech cache: blocking helpers run in worker threads."""
