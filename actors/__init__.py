"""Model and I/O steps as plain Python classes; the job turns them into Ray actors. Never imports ray."""
