"""What runs report while they work: the terminal display (a logging handler) and the trackers."""
