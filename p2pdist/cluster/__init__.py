"""Several schedulers and seeds without a leader: who owns a task, and which members are alive."""
