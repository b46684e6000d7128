"""The lab: a whole region on one machine, and the attacks that put it to the test."""
