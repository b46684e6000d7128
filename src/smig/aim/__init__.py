"""AIM: adjacent integrity measurement of hypervisors."""
