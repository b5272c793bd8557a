"""The soak of issue 18: the whole stack under load with overlapping faults (`make soak`)."""
