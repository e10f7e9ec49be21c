"""Transport building blocks (frames, pacing). The sender/receiver and sessions are still to come."""
